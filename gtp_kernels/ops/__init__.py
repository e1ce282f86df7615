"""Public op wrappers. Each op lives in its own module (gtp_kernels/ops/<op>.py) with its fake
kernel, autograd and backend choice; every wrapper takes `backend="auto" | "cpu" | "cuda" |
"triton" | "reference"`."""

from gtp_kernels.ops._backend import BACKENDS, resolve_backend
from gtp_kernels.ops.propagate import propagate

__all__ = ["BACKENDS", "propagate", "resolve_backend"]
