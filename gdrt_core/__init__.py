"""gdrt_core: the GDRT library. Every stage, the loss, generation, metrics, tracking and artifact I/O.

Importing this package is cheap: heavy dependencies (torch, transformers, mlflow, kfp, deepspeed) are
imported inside the functions that need them.
"""

__version__ = "0.1.0"

from gdrt_core.errors import GdrtError  # noqa: E402

__all__ = ["GdrtError", "__version__"]
