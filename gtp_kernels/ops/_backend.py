"""Backend choice for every public op wrapper (gtp_kernels.ops.<op>): the one place where the
dispatch logic lives."""

from __future__ import annotations

import functools

import torch

from gtp_kernels._extension import has_kernel, require_kernel

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")

_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA"}


@functools.cache
def _triton_import_error() -> str | None:
    """None when gtp_kernels.triton imports (and registers torch.ops.gtp_triton.*), else why."""
    try:
        import gtp_kernels.triton  # noqa: F401
    except ImportError as exc:  # triton not installed (CPU-only torch builds, macOS, Windows)
        return str(exc)
    return None


def _triton_error(op: str, device_type: str) -> str | None:
    """Why torch.ops.gtp_triton.<op> cannot run on `device_type` tensors here, or None."""
    err = _triton_import_error()
    if err is not None:
        return (
            f"gtp.{op}: the Triton backend needs the triton package ({err}); it comes with "
            "torch's Linux CUDA wheels (`pip install triton` otherwise). Or use backend='auto', "
            "'cpu' or 'reference'"
        )
    import gtp_kernels.triton as gt

    if op not in gt.OPS:
        return f"gtp.{op} has no Triton kernel (gtp_kernels.triton has {', '.join(gt.OPS)})"
    return gt.device_error(op, torch.device(device_type))


@torch.compiler.assume_constant_result  # dynamo cannot trace the import and the device probe
def triton_runs(op: str, device_type: str) -> bool:
    """Whether torch.ops.gtp_triton.<op> can run on tensors of `device_type` in this process:
    CUDA tensors when triton imports; CPU tensors only under the Triton interpreter
    (TRITON_INTERPRET=1 set before gtp_kernels.triton was imported)."""
    return _triton_error(op, device_type) is None


def resolve_backend(op: str, backend: str, device: torch.device) -> str:
    """Which implementation runs `op` on tensors on `device`: "compiled" (torch.ops.gtp.<op>,
    the C++ CPU / CUDA kernels), "triton" (torch.ops.gtp_triton.<op>) or "reference".

    auto: the compiled kernel for the device when this build has it; else, on CUDA tensors,
    Triton when it is installed; else the reference.
    cpu / cuda: the compiled kernel; an error that says how to get it if it is missing or the
    tensors are on another device.
    triton: the Triton kernels, on CUDA tensors (CPU tensors only under the Triton
    interpreter); an error that says why when they cannot run.
    """
    if backend not in BACKENDS:
        raise ValueError(f"gtp.{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    if backend == "auto":
        key = _DISPATCH_KEY.get(device.type)
        if key is not None and has_kernel(op, key):
            return "compiled"
        if device.type == "cuda" and triton_runs(op, "cuda"):
            return "triton"
        return "reference"
    if backend == "triton":
        if not triton_runs(op, device.type):
            raise RuntimeError(_triton_error(op, device.type))
        return "triton"
    if device.type != backend:
        raise RuntimeError(
            f"gtp.{op}: backend={backend!r} needs tensors on {backend}, got {device}"
        )
    require_kernel(op, _DISPATCH_KEY[backend])
    return "compiled"


def triton_op(op: str):
    """torch.ops.gtp_triton.<op> (importing gtp_kernels.triton registers it)."""
    import gtp_kernels.triton  # noqa: F401

    return getattr(torch.ops.gtp_triton, op)
