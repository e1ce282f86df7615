"""Where the Triton tests run: DEVICE = "cpu" under the Triton interpreter, "cuda" on a GPU,
None (with WHY) where the kernels cannot run."""

from __future__ import annotations

import torch


def _mode() -> tuple[str | None, str]:
    try:
        import gtp_kernels.triton as gt
    except ImportError as exc:
        return None, f"gtp_kernels.triton does not import here ({exc})"
    if gt.INTERPRETER:
        return "cpu", "Triton interpreter on CPU tensors"
    if torch.cuda.is_available():
        return "cuda", "Triton kernels compiled for the GPU"
    return None, (
        "the Triton kernels need a GPU or the Triton interpreter: "
        "TRITON_INTERPRET=1 python -m pytest tests/triton_ops"
    )


DEVICE, WHY = _mode()
