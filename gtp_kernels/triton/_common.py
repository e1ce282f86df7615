"""What every Triton op shares: where the kernels may run, the dtypes they take, the element
helpers (order keys, bfloat16 rounding, NaN-propagating max) and the op registration.

Where the kernels run. A `@triton.jit` function becomes an interpreted one when
TRITON_INTERPRET=1 is set before triton decorates it (i.e. before gtp_kernels.triton is first
imported); the interpreter runs each program instance in numpy on CPU tensors. So:
- CUDA tensors: always (a GPU build of triton compiles the kernels for the device);
- CPU tensors: only under the interpreter (how CI runs every Triton kernel); otherwise a clear
  RuntimeError that says how to get either.

Registration. Every op is a `torch.library.custom_op` in the "gtp_triton" namespace with the
same schema as its gtp:: twin, plus a fake kernel. Not `torch.library.triton_op`: under the
interpreter (the only place CI can run the kernels) triton_op fails opcheck and
torch.compile, because the interpreter reads tensor data pointers during fake tracing;
custom_op passes both there and works unchanged on a GPU, where Inductor then treats the op
as opaque (it cannot fuse into our kernels anyway: each op is one or a few hand-written
launches). Measured here, ../shared/GPU_NOTES.md.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

NAMESPACE = "gtp_triton"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@triton.jit
def order_key(x):
    """float32 -> int32 with the order -inf < finite < +inf < NaN: -0.0 and +0.0 map to the same
    key (a tie) and every NaN to the largest key (all NaNs equal). Signed comparisons of keys
    are comparisons of the floats (csrc/common/order.h's order_key, as a signed int)."""
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    key = tl.where(x == 0.0, 0, key)
    return tl.where(x != x, 0x7FFFFFFF, key)


@triton.jit
def round_bf16(x):
    """float32 x rounded to the nearest bfloat16 (ties to even), still as float32, so that the
    cast to bfloat16 that follows is exact. A GPU's cast rounds this way already (then this is
    a no-op on the value); the Triton interpreter's cast truncates, which would make bfloat16
    outputs differ from torch's by one ulp in about half the entries. NaN stays NaN."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(x != x, x, rounded.to(tl.float32, bitcast=True))


@triton.jit
def store_cast(ptr, x, mask, IS_BF16: tl.constexpr):
    """Store float32 x into a tensor of ptr's dtype (float32, float16 or bfloat16),
    rounding to nearest even on every backend of triton (see round_bf16)."""
    if IS_BF16:
        x = round_bf16(x)
    tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def nan_max(a, b):
    """Elementwise max that returns NaN when either side is NaN (as torch.amax does)."""
    return tl.where((a != a) | (b != b), a + b, tl.maximum(a, b))


@triton.jit
def _probe():
    pass


INTERPRETER = isinstance(_probe, InterpretedFunction)


def device_error(op: str, device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on `device` in this process, or None if they can."""
    if device.type == "cuda":
        return None
    if device.type == "cpu" and INTERPRETER:
        return None
    how = (
        "set TRITON_INTERPRET=1 before gtp_kernels is imported to run the Triton kernels on CPU "
        "tensors under the Triton interpreter (slow: for tests), "
        if device.type == "cpu"
        else ""
    )
    return (
        f"gtp.{op}: the Triton backend runs on CUDA tensors, got {device} tensors; "
        f"{how}or use backend='auto', 'cpu' or 'reference'"
    )


def check_device(op: str, t: torch.Tensor) -> None:
    err = device_error(op, t.device)
    if err is not None:
        raise RuntimeError(err)


def check_dtype(op: str, t: torch.Tensor, name: str) -> None:
    """The Triton kernels compute in float32 and take float32 / float16 / bfloat16 inputs;
    float64 (not a bad input elsewhere) gets this error, which says where it runs."""
    if t.dtype not in DTYPES:
        raise ValueError(
            f"gtp.{op}: the Triton backend takes {name} as float32, float16 or bfloat16, got "
            f"{t.dtype} (backend='cpu', 'cuda' or 'reference' take float64)"
        )


def is_bf16(t: torch.Tensor) -> bool:
    return t.dtype == torch.bfloat16


def next_pow2(n: int, least: int = 1) -> int:
    return max(least, triton.next_power_of_2(max(1, n)))


def qualified(op: str) -> str:
    """The registered name of a Triton op, e.g. "gtp_triton::attention"."""
    return f"{NAMESPACE}::{op}"


# The schemas of csrc/registration.cpp, without the op names (tests/triton/test_registration.py
# checks that they stay identical to torch.ops.gtp.*'s), so that every autograd formula, fake
# kernel and ONNX translation written for a gtp:: op serves its gtp_triton:: twin.
SCHEMAS = {
    "build_graph": "(Tensor tokens, int height, int width, int num_neighbours, str graph)"
    " -> (Tensor index, Tensor weight)",
    "select_tokens": "(Tensor score, int num_prop) -> (Tensor keep, Tensor prop)",
    "propagate": "(Tensor x, Tensor index, Tensor weight, Tensor keep, float alpha, "
    "int num_prefix, Tensor? sizes) -> (Tensor x_out, Tensor sizes_out, Tensor index_out, "
    "Tensor weight_out)",
    "attention": "(Tensor q, Tensor k, Tensor v, Tensor? log_sizes, float scale, "
    "float sparsity, int num_prefix, str score) -> (Tensor out, Tensor score)",
}


def register(op: str, launcher, fake, dtype_arg: str | None = None):
    """Register `launcher` as torch.ops.gtp_triton.<op> with the gtp:: schema and `fake` as its
    fake kernel. dtype_arg: the first argument's name when it must be float32 / float16 /
    bfloat16 (checked by the fake kernel too, so torch.compile fails as eager does)."""
    custom = torch.library.custom_op(qualified(op), launcher, mutates_args=(), schema=SCHEMAS[op])

    def checked_fake(*args):
        if dtype_arg is not None:
            check_dtype(op, args[0], dtype_arg)
        return fake(*args)

    custom.register_fake(checked_fake)
    return custom


# ------------------------------------------------------------------------------- launches
# Every launcher starts its kernels through `launch`, so that the CI compile gate
# (benchmarks/triton_resources.py) can ask a launcher which kernels and configurations it
# would start for a given problem, on meta tensors, without running anything: `recording()`
# collects the launches instead of running them. The gate then compiles exactly those for
# sm_80 and sm_90.


@dataclasses.dataclass
class Launch:
    """One kernel launch as a launcher would make it."""

    kernel: object
    grid: tuple
    args: tuple
    constexprs: dict
    num_warps: int
    num_stages: int


_recorded: list[Launch] | None = None


def recording_launches() -> bool:
    """True inside `recording()`: launchers must not read tensor data (they get meta tensors)."""
    return _recorded is not None


@contextlib.contextmanager
def recording():
    """Collect the launches of the launchers called inside (a list of Launch) instead of
    running them."""
    global _recorded
    saved, _recorded = _recorded, []
    try:
        yield _recorded
    finally:
        _recorded = saved


def launch(kernel, grid, *args, num_warps: int = 4, num_stages: int = 2, **constexprs) -> None:
    """kernel[grid](*args, **constexprs) with these warps and pipeline stages."""
    if _recorded is not None:
        _recorded.append(Launch(kernel, tuple(grid), args, constexprs, num_warps, num_stages))
        return
    kernel[grid](*args, num_warps=num_warps, num_stages=num_stages, **constexprs)
