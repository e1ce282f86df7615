"""The machine's measured ceilings, for the derived rates of the other benchmarks:
memory bandwidth (a large tensor copy, read + write bytes) and float32 GEMM throughput."""

from __future__ import annotations

import argparse

import torch

from gtp_kernels.benchmark import timing


def measure(rounds: int = 7) -> dict[str, float]:
    """Median GB/s of a 256 MiB copy and GFLOP/s of a 2048^3 float32 matmul."""
    src = torch.randn(64 << 20)  # 256 MiB: far beyond the last-level cache
    dst = torch.empty_like(src)
    a = torch.randn(2048, 2048)
    b = torch.randn(2048, 2048)
    out = torch.empty(2048, 2048)
    times = timing.alternating(
        {"copy": lambda: dst.copy_(src), "gemm": lambda: torch.mm(a, b, out=out)},
        rounds=rounds,
        warmup=1,
        progress=False,
    )
    return {
        "copy_GBps": 2 * src.numel() * 4 / timing.median(times["copy"]) / 1e9,
        "gemm_GFLOPs": 2 * 2048**3 / timing.median(times["gemm"]) / 1e9,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    timing.ensure_malloc_env()
    res = measure(args.rounds)
    print(f"# {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(
        timing.markdown_table(
            ["ceiling", "value"],
            [
                ["copy bandwidth (read + write)", f"{res['copy_GBps']:.1f} GB/s"],
                ["float32 GEMM 2048^3", f"{res['gemm_GFLOPs']:.0f} GFLOP/s"],
            ],
        )
    )


if __name__ == "__main__":
    main()
