"""`python -m gtp_kernels.info`: versions, how the extension was built, which gtp op has which
kernel (CPU, CUDA, Meta/fake, Triton) and where the Triton kernels run in this process. Paste its
output into bug reports."""

from __future__ import annotations

import importlib.metadata
import platform

import torch

OPS = ("build_graph", "select_tokens", "propagate", "attention")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def triton_kernels() -> tuple[dict[str, bool], str]:
    """({op: whether torch.ops.gtp_triton.<op> is registered}, where the Triton kernels run in
    this process, or why they run nowhere)."""
    try:
        import gtp_kernels.triton as gt  # registers torch.ops.gtp_triton.*
    except ImportError as exc:  # no triton package (CPU-only torch builds, macOS, Windows)
        return {op: False for op in OPS}, f"nowhere: gtp_kernels.triton does not import ({exc})"
    registered = {op: hasattr(torch.ops.gtp_triton, op) for op in OPS}
    if gt.INTERPRETER:
        where = (
            "on CPU tensors, under the Triton interpreter (TRITON_INTERPRET=1 was set before "
            "gtp_kernels.triton was imported: numpy, slow, for tests)"
        )
    elif torch.cuda.is_available():
        where = f"on CUDA tensors ({torch.cuda.get_device_name()}), compiled by Triton for the GPU"
    else:
        where = (
            "nowhere in this process: they run on CUDA tensors and no GPU is visible "
            "(torch.cuda.is_available() is False); TRITON_INTERPRET=1 runs them on CPU tensors "
            "under the Triton interpreter"
        )
    return registered, where


def collect() -> dict:
    """Everything the report prints, as a dict (used by tests and the benchmark's CSV)."""
    import gtp_kernels
    import gtp_kernels.ops  # noqa: F401  (registers the fake kernels)
    from gtp_kernels._extension import _C, extension_error, has_kernel

    triton_ops, triton_runs = triton_kernels()
    info = {
        "gtp_kernels": gtp_kernels.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "triton": _version("triton"),
        "timm": _version("timm"),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "extension": _C.build_info() if _C is not None else None,
        "extension_error": extension_error(),
        "triton_runs": triton_runs,
        "kernels": {
            op: {
                **{key: has_kernel(op, key) for key in ("CPU", "CUDA", "Meta")},
                "Triton": triton_ops[op],
            }
            for op in OPS
        },
    }
    return info


def main() -> None:
    info = collect()
    for key, value in info.items():
        if key not in ("kernels", "triton_runs"):
            print(f"{key:16s} {value}")
    print()
    print("| op | CPU | CUDA | Meta (fake) | Triton |")
    print("|---|---|---|---|---|")
    for op, keys in info["kernels"].items():
        marks = " | ".join("yes" if keys[k] else "-" for k in ("CPU", "CUDA", "Meta", "Triton"))
        print(f"| {op} | {marks} |")
    print()
    print("Triton: yes where torch.ops.gtp_triton.<op> is registered.")
    print(f"Triton kernels run {info['triton_runs']}.")


if __name__ == "__main__":
    main()
