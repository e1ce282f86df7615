"""Loads the compiled extension gtp_kernels._C (which registers torch.ops.gtp.*) if it was built
(GTP_LOAD_EXTENSION=0 skips it).

A missing or broken build is not an error at import: the reference backend still works, and
`backend="cpu"` raises a message that says how to build the extension.
"""

from __future__ import annotations

import os

import torch

_ERROR: str | None = None
if os.environ.get("GTP_LOAD_EXTENSION", "1") == "0":
    # Asked not to (e.g. benchmarks/gpu_check.sh runs the Triton tests while the extension is
    # being built): everything but the compiled kernels works.
    _C = None
    _ERROR = "not loaded: GTP_LOAD_EXTENSION=0"
else:
    try:
        from gtp_kernels import _C  # noqa: F401  (registers the ops)
    except ImportError as exc:  # not built, or built against another torch
        _C = None
        _ERROR = str(exc)

BUILD_HINT = (
    "the compiled extension gtp_kernels._C is not available ({err}). Build it with "
    "`pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`) "
    "against the installed torch."
)


def extension_available() -> bool:
    """True when gtp_kernels._C imported and registered torch.ops.gtp.*."""
    return _C is not None


def extension_error() -> str | None:
    """Why the extension could not be imported, or None."""
    return _ERROR


@torch.compiler.assume_constant_result  # dynamo cannot trace the dispatcher query
def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether torch.ops.gtp.<op> has a kernel registered for `dispatch_key` (CPU, CUDA, Meta)."""
    if _C is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"gtp::{op}", dispatch_key)


def require_kernel(op: str, dispatch_key: str) -> None:
    """Raise a RuntimeError that says how to fix it when the kernel is missing."""
    if _C is None:
        raise RuntimeError(f"gtp.{op}: " + BUILD_HINT.format(err=_ERROR))
    if not has_kernel(op, dispatch_key):
        raise RuntimeError(
            f"gtp.{op} has no {dispatch_key} kernel in this build of gtp_kernels._C "
            f"(see `python -m gtp_kernels.info`)."
        )
