"""Triton kernels of every gtp op, registered as torch.ops.gtp_triton.<op> with the schemas of
their torch.ops.gtp.<op> twins (gtp_kernels/triton/_common.py says why custom_op, and where the
kernels run: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).

Users call them through the public wrappers (`gtp_kernels.ops.<op>(..., backend="triton")`,
`gtp_kernels.patch.timm(model, backend="triton")`); importing this package needs the triton
package and registers the ops. One module per op: its @triton.jit kernels, the launcher and the
registration at the bottom.
"""

from gtp_kernels.triton import attention, build_graph, propagate, select_tokens
from gtp_kernels.triton._common import DTYPES, INTERPRETER, NAMESPACE, SCHEMAS, device_error

# The ops with a Triton kernel (registered as torch.ops.gtp_triton.<op> by the imports above).
OPS = ("build_graph", "select_tokens", "propagate", "attention")

__all__ = [
    "DTYPES",
    "INTERPRETER",
    "NAMESPACE",
    "OPS",
    "SCHEMAS",
    "device_error",
    "attention",
    "build_graph",
    "propagate",
    "select_tokens",
]
