"""What the per-op benchmarks share across devices: which backends run an op here, the op's
function per backend, and the device's ceilings (datasheet peaks or measured) for the derived
rates.

Providers. "reference" (gtp_kernels.reference, any device) always; "cpu" / "cuda" (the compiled
kernel, torch.ops.gtp.<op>) on tensors of that device when the build has it; "triton"
(torch.ops.gtp_triton.<op>) on CUDA tensors, and on CPU tensors under the Triton interpreter
(TRITON_INTERPRET=1, how CI smoke-tests the GPU code paths). A backend that cannot run is
reported with the reason, never dropped silently.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from gtp_kernels.benchmark import timing

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PROVIDERS = ("reference", "cpu", "cuda", "triton")


def add_providers_argument(parser, extra: str = "") -> None:
    """--providers: which backends a microbenchmark times (the reference always runs: it is
    what the others are checked against)."""
    parser.add_argument(
        "--providers",
        nargs="+",
        default=list(PROVIDERS),
        choices=PROVIDERS,
        help=f"backends to time{extra} (default: every one that runs here; the reference "
        "always runs, it is what the others are checked against)",
    )


def providers(op: str, device: torch.device, wanted=PROVIDERS) -> tuple[list[str], dict]:
    """(the backends that run `op` on `device` tensors here: "reference" always (the others are
    checked against it), then those of `wanted` that run; {backend: why not} for the others of
    `wanted` that concern this device: the device's compiled kernel and Triton)."""
    from gtp_kernels.ops import resolve_backend

    ok, why_not = ["reference"], {}
    for backend in wanted:
        if backend == "reference":
            continue
        if backend in ("cpu", "cuda") and backend != device.type:
            continue  # another device's kernel: not a provider for these tensors
        try:
            resolve_backend(op, backend, device)
        except RuntimeError as exc:
            why_not[backend] = str(exc)
        else:
            ok.append(backend)
    return ok, why_not


def op_function(op: str, backend: str) -> Callable:
    """The implementation `backend` runs for `op`, without the public wrapper's dispatch."""
    if backend == "reference":
        from gtp_kernels import reference

        return getattr(reference, op)
    if backend == "triton":
        from gtp_kernels.ops._backend import triton_op

        return triton_op(op)
    return getattr(torch.ops.gtp, op)


def notes(op: str, device: torch.device, backends: list[str], why_not: dict) -> list[str]:
    """Report lines: each backend not run and why; Triton's times being the interpreter's."""
    lines = [f"# {op}: provider {b} not run: {why}" for b, why in why_not.items()]
    if "triton" in backends and device.type == "cpu":
        lines.append(
            f"# {op}: provider triton runs under the Triton interpreter (TRITON_INTERPRET=1, "
            "numpy on the CPU): a smoke test of the GPU code path, not a GPU's time"
        )
    return lines


# ------------------------------------------------------------------------------- ceilings

# Vendor datasheet figures: (name substring, memory GB/s, dense float16/bfloat16 tensor-core
# TFLOP/s, float32 (non-tensor) TFLOP/s). The first entry whose substring is in
# torch.cuda.get_device_name() applies, so the specific names come first.
PEAKS = (
    ("H200 NVL", 4800, 835, 60),
    ("H200", 4800, 989, 67),
    ("H100 PCIe", 2000, 756, 51),
    ("H100 NVL", 3900, 835, 60),
    ("H100", 3350, 989, 67),  # SXM5: "NVIDIA H100 80GB HBM3"
    ("A100-SXM4-80GB", 2039, 312, 19.5),
    ("A100 80GB PCIe", 1935, 312, 19.5),
    ("A100", 1555, 312, 19.5),  # the 40 GB parts
)


@dataclasses.dataclass
class Ceilings:
    """Memory bandwidth (GB/s, bytes read + written) and arithmetic rate (TFLOP/s) for a dtype,
    and where they come from."""

    gbps: float
    tflops: float
    source: str

    def cells(self, flop: float, nbytes: float, seconds: float) -> list[str]:
        """'achieved (share of the ceiling)' for the FLOP and byte counts of one call."""
        tf, gb = flop / seconds / 1e12, nbytes / seconds / 1e9
        return [f"{tf:.1f} ({tf / self.tflops:.0%})", f"{gb:.0f} ({gb / self.gbps:.0%})"]


def datasheet(device_name: str, dtype: torch.dtype) -> Ceilings | None:
    for key, gbps, tensor, fp32 in PEAKS:
        if key in device_name:
            tflops = fp32 if dtype == torch.float32 else tensor
            kind = "float32" if dtype == torch.float32 else "dense tensor-core"
            return Ceilings(gbps, tflops, f"datasheet {key}: {gbps} GB/s, {kind} {tflops} TFLOP/s")
    return None


def measure(device: torch.device, dtype: torch.dtype = torch.float32, rounds: int = 7) -> Ceilings:
    """Median rates of a large copy (read + write bytes) and a large GEMM in `dtype` (CPU: a
    256 MiB copy and 2048^3; CUDA: a 2 GiB copy and 8192^3, timed with CUDA events)."""
    cuda = device.type == "cuda"
    elements = (512 << 20) if cuda else (64 << 20)  # float32 elements: 2 GiB / 256 MiB
    side = 8192 if cuda else 2048
    gen = torch.Generator(device=device).manual_seed(0)
    src = torch.randn(elements, device=device, generator=gen)
    dst = torch.empty_like(src)
    a = torch.randn(side, side, device=device, generator=gen).to(dtype)
    b = torch.randn(side, side, device=device, generator=gen).to(dtype)
    out = torch.empty(side, side, device=device, dtype=dtype)
    times = timing.alternating(
        {"copy": lambda: dst.copy_(src), "gemm": lambda: torch.mm(a, b, out=out)},
        rounds=rounds,
        warmup=1,
        progress=False,
        device=device,
    )
    gbps = 2 * src.numel() * 4 / timing.median(times["copy"]) / 1e9
    tflops = 2 * side**3 / timing.median(times["gemm"]) / 1e12
    name = str(dtype).removeprefix("torch.")
    return Ceilings(
        gbps,
        tflops,
        f"measured: copy {gbps:.0f} GB/s ({2 * elements * 4 >> 20} MiB moved), "
        f"{name} GEMM {side}^3 {tflops:.1f} TFLOP/s",
    )


def ceilings(device: torch.device, dtype: torch.dtype, measured: bool = False) -> Ceilings:
    """The device's ceilings for `dtype`: the datasheet's for a known GPU, else (or when asked)
    measured here."""
    if device.type == "cuda" and not measured:
        found = datasheet(torch.cuda.get_device_name(device), dtype)
        if found is not None:
            return found
    return measure(device, dtype)


def describe(device: torch.device) -> str:
    """One line: the device, versions and git sha, for a report's header."""
    machine = timing.machine_description()
    where = (
        f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
        if device.type == "cuda"
        else f"{machine['cpu']}, {machine['threads']} threads"
    )
    try:
        import triton

        tri = f", triton {triton.__version__}"
    except ImportError:
        tri = ""
    return f"{where}, torch {machine['torch']}{tri}, git {machine['git']}"
