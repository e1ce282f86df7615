"""Backend choice for every public op wrapper (gtp_kernels.ops.<op>)."""

from __future__ import annotations

import torch

from gtp_kernels._extension import has_kernel, require_kernel

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")

_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA"}


def resolve_backend(op: str, backend: str, device: torch.device) -> str:
    """Return "compiled" (call torch.ops.gtp.<op>) or "reference" for a tensor on `device`.

    auto: the compiled kernel for the device when this build has it, else the reference.
    cpu / cuda: the compiled kernel; an error that says how to get it if it is missing or the
    tensors are on another device. triton: not implemented for any op yet, so it says so.
    """
    if backend not in BACKENDS:
        raise ValueError(f"gtp.{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    if backend == "auto":
        key = _DISPATCH_KEY.get(device.type)
        return "compiled" if key is not None and has_kernel(op, key) else "reference"
    if backend == "triton":
        raise RuntimeError(
            f"gtp.{op}: the Triton backend is not implemented yet; use backend='auto', "
            "'cpu' or 'reference'"
        )
    if device.type != backend:
        raise RuntimeError(
            f"gtp.{op}: backend={backend!r} needs tensors on {backend}, got {device}"
        )
    require_kernel(op, _DISPATCH_KEY[backend])
    return "compiled"
