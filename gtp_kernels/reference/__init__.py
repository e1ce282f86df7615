"""Pure-PyTorch implementation of every gtp op: the definition of correct (../SPEC.md).

One op per module; the functions have the same signatures as torch.ops.gtp.*, so reference and
kernels are interchangeable. Readable and differentiable, not fast.
"""

from gtp_kernels.reference.propagate import propagate

__all__: list[str] = ["propagate"]
