"""Public op wrappers. Each op lives in its own module (gtp_kernels/ops/<op>.py) with its fake
kernel, autograd and backend choice; every wrapper takes `backend="auto" | "cpu" | "cuda" |
"triton" | "reference"`."""

from gtp_kernels.ops._backend import BACKENDS, resolve_backend
from gtp_kernels.ops.attention import attention
from gtp_kernels.ops.build_graph import build_graph
from gtp_kernels.ops.propagate import propagate
from gtp_kernels.ops.select_tokens import select_tokens

__all__ = [
    "BACKENDS",
    "attention",
    "build_graph",
    "propagate",
    "resolve_backend",
    "select_tokens",
]
