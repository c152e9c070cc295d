"""The container image every component runs in (the project's one image, docker/Dockerfile[.cuda]).

Set GDRT_IMAGE when compiling to point the pipeline at your registry, e.g.
`GDRT_IMAGE=registry.example.com/ml/gdrt:0.1.0-cuda python pipelines/compile.py`.
"""

import os

DEFAULT_IMAGE = "gdrt/gdrt:0.1.0"
IMAGE = os.environ.get("GDRT_IMAGE", DEFAULT_IMAGE)
