"""The machine's measured ceilings, for the derived rates of the other benchmarks: memory
bandwidth (a large tensor copy, read + write bytes) and GEMM throughput.

    python benchmarks/ceiling.py                                  # CPU: 256 MiB copy, fp32 2048^3
    python benchmarks/ceiling.py --device cuda --dtype float16    # GPU: 2 GiB copy, fp16 8192^3
                                                                  # (CUDA events), and the
                                                                  # datasheet's figures
"""

from __future__ import annotations

import argparse

import torch

from gtp_kernels.benchmark import devices, timing


def measure(rounds: int = 7) -> dict[str, float]:
    """Median GB/s of a 256 MiB copy and GFLOP/s of a 2048^3 float32 matmul on the CPU."""
    c = devices.measure(torch.device("cpu"), torch.float32, rounds)
    return {"copy_GBps": c.gbps, "gemm_GFLOPs": 1e3 * c.tflops}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=list(devices.DTYPES), help="of the GEMM")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        timing.ensure_malloc_env()
        dtype = devices.DTYPES[args.dtype or "float32"]
    else:
        dtype = devices.DTYPES[args.dtype or "float16"]
    c = devices.measure(device, dtype, args.rounds)
    name = str(dtype).removeprefix("torch.")
    print(f"# {devices.describe(device)}")
    rows = [
        ["copy bandwidth (read + write)", f"{c.gbps:.1f} GB/s"],
        [f"{name} GEMM", f"{1e3 * c.tflops:.0f} GFLOP/s"],
    ]
    if device.type == "cuda":
        sheet = devices.datasheet(torch.cuda.get_device_name(device), dtype)
        rows.append(["datasheet", sheet.source if sheet else "this GPU is not in the table"])
    print(timing.markdown_table(["ceiling", "value"], rows))


if __name__ == "__main__":
    main()
