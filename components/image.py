"""The container image every component runs in (the project's one image, docker/Dockerfile[.cuda]).

Set GDRT_IMAGE when compiling to point the pipeline at your registry, e.g.
`GDRT_IMAGE=registry.example.com/ml/gdrt:0.1.0-cuda python pipelines/compile.py`. An empty or blank
GDRT_IMAGE is refused (it would compile a pipeline whose steps have no image); unset it for the default.
"""

import os

DEFAULT_IMAGE = "gdrt/gdrt:0.1.0"
IMAGE_ENV = "GDRT_IMAGE"


def image_from_env(environ=os.environ) -> str:
    """GDRT_IMAGE if set, else the default; a value that is empty or holds whitespace (no image reference
    does) is a GdrtError naming the variable."""
    value = environ.get(IMAGE_ENV)
    if value is None:
        return DEFAULT_IMAGE
    if not value.strip() or any(c.isspace() for c in value):
        from gdrt_core.errors import GdrtError

        what = "is empty" if not value.strip() else "holds whitespace"
        raise GdrtError(f"{IMAGE_ENV}={value!r} {what}: the pipeline's steps would have no container image",
                        path=IMAGE_ENV, hint=f"set it to an image, e.g. registry.example.com/ml/gdrt:0.1.0, or "
                                             f"unset it for the default {DEFAULT_IMAGE}")
    return value


IMAGE = image_from_env()
