"""Pure-PyTorch implementation of every gtp op: the definition of correct (../SPEC.md).

One op per module; the functions have the same signatures as torch.ops.gtp.*, so reference and
kernels are interchangeable. Readable and differentiable, not fast.
"""

from gtp_kernels.reference.attention import attention
from gtp_kernels.reference.build_graph import build_graph
from gtp_kernels.reference.propagate import propagate
from gtp_kernels.reference.select_tokens import select_tokens

__all__: list[str] = ["attention", "build_graph", "propagate", "select_tokens"]
