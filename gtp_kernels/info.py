"""`python -m gtp_kernels.info`: versions, how the extension was built, and which gtp op has
which kernel (CPU, CUDA, Meta/fake). Paste its output into bug reports."""

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


def collect() -> dict:
    """Everything the report prints, as a dict (used by tests and the benchmark's CSV)."""
    import gtp_kernels
    import gtp_kernels.ops  # noqa: F401  (registers the fake kernels)
    from gtp_kernels._extension import _C, extension_error, has_kernel

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
        "kernels": {
            op: {key: has_kernel(op, key) for key in ("CPU", "CUDA", "Meta")} for op in OPS
        },
    }
    return info


def main() -> None:
    info = collect()
    for key, value in info.items():
        if key != "kernels":
            print(f"{key:16s} {value}")
    print()
    print("| op | CPU | CUDA | Meta (fake) | Triton |")
    print("|---|---|---|---|---|")
    for op, keys in info["kernels"].items():
        marks = " | ".join("yes" if keys[k] else "-" for k in ("CPU", "CUDA", "Meta"))
        print(f"| {op} | {marks} | - |")


if __name__ == "__main__":
    main()
