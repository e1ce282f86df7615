"""Argument checks of the reference ops (and of the fake kernels that reuse them): the Python
twins of csrc/common/checks.h. Each raises ValueError whose message names the op and the
argument, worded as the C++ kernel words it, so every backend fails the same way."""

from __future__ import annotations

import torch

FLOATING = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
    torch.int32: "int32",
    torch.int64: "int64",
}


def fail(op: str, message: str) -> None:
    """Raise the ValueError of a failed check: '<op>: <message>'."""
    raise ValueError(f"{op}: {message}")


def check_dim(op: str, t: torch.Tensor, name: str, dims: int, layout: str = "") -> None:
    """t.dim() == dims; `layout` names the dimensions in the message, e.g. ' (B, H, N, d)'."""
    if t.dim() != dims:
        fail(op, f"{name} must have {dims} dimensions{layout}, got shape {list(t.shape)}")


def check_dtype(op: str, t: torch.Tensor, name: str, *allowed: torch.dtype) -> None:
    """t.dtype is one of `allowed` ('must be float32', 'must be float32, ... or float64')."""
    if t.dtype not in allowed:
        names = [_DTYPE_NAMES.get(d, str(d)) for d in allowed]
        said = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
        fail(op, f"{name} must be {said}, got {t.dtype}")


def check_in_range(op: str, name: str, value: int, lo: int, hi: int, bounds: str) -> None:
    """lo <= value <= hi; `bounds` says them symbolically, e.g. '[0, N]'."""
    if not lo <= value <= hi:
        fail(op, f"{name} must be in {bounds} = [{lo}, {hi}], got {value}")


def check_same_device(
    op: str, ref: torch.Tensor, ref_name: str, **tensors: torch.Tensor | None
) -> None:
    """Every tensor given (None skipped) is on ref's device."""
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            fail(
                op,
                f"{name} must be on the same device as {ref_name} ({ref.device}), got {t.device}",
            )
