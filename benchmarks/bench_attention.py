"""Benchmark gtp.attention (the compiled CPU / CUDA kernels and Triton) against the reference and
PyTorch SDPA.

DeiT-S shapes by default: H=6, d=64, N=197 (first block) and N=189 (after propagation), batch
64 on CPU and 256 on CUDA, float32, q/k/v as timm makes them (strided views of one qkv
projection). Providers run interleaved round by round (a shared machine drifts; every provider
sees the same drift) and report the median of the rounds; on CUDA each timing is CUDA events
around enough calls to last ~20 ms, after warm-up. Each provider is checked against the
reference first.

  python benchmarks/bench_attention.py [--rounds 9] [--tokens 197 189] [--batch 64]
  python benchmarks/bench_attention.py --device cuda --dtype float16 --heads 12  # DeiT-B

Providers: sdpa (torch.nn.functional.scaled_dot_product_attention on the same q, k, v: theta 1,
no score; on CUDA in float16 / bfloat16 forced to FlashAttention, the "flash" baseline that
"vs sdpa" divides by), then for every backend that runs here (cpu or cuda, triton, reference):
theta 1 with score "none", theta 1 and theta --theta with score mixed_max. --providers picks a
subset; a backend that cannot run is listed with the reason.

FLOP floor: the two GEMMs of every (image, head) tile, QK^T and AV, are 2 * N * N * d MACs
each, 4 * N^2 * d MACs = 8 * N^2 * d FLOP per tile; softmax, threshold and scores are O(N^2)
per tile and not counted. The rates below are that floor divided by the measured time. Byte
floor (CUDA table): q, k, v read and out written once, plus the score written (and log sizes
read) where a provider has them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

import gtp_kernels.ops  # noqa: F401  (fake kernel, autograd)
from gtp_kernels.benchmark import devices
from gtp_kernels.benchmark.timing import alternating, calibrate, ensure_malloc_env, markdown_table

PHASES = ("pack", "qk", "softmax", "select", "mask_scores", "av")
SDPA = "sdpa (theta 1, no score)"
# Agreement with the reference: float32 to float rounding; float16 / bfloat16 outputs are
# rounded once from float32 (the reference computes in float32 too).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def timm_qkv(b, h, n, d, device="cpu", dtype=torch.float32):
    qkv = torch.randn(b, n, 3, h, d).to(device, dtype)
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def check(name, got, want, dtype=torch.float32):
    """Agreement with the reference. A probability within float rounding of the threshold can
    be masked by one and kept by the other, so a tiny fraction of outputs may differ."""
    out, score = got
    ref_out, ref_score = want
    tol = TOL[dtype]
    close = torch.isclose(out.float(), ref_out.float(), atol=tol, rtol=tol).float().mean().item()
    if close < 0.999:
        raise SystemExit(f"{name}: only {close:.4%} of outputs match the reference")
    if score.numel():
        low = score.topk(3, -1, largest=False).indices.sort(-1).values
        ref_low = ref_score.topk(3, -1, largest=False).indices.sort(-1).values
        same = (low == ref_low).all(-1).float().mean().item()
        if same < 0.95:
            raise SystemExit(f"{name}: lowest-3 tokens match the reference in {same:.0%} images")


def breakdown(call, reps=5):
    """Median thread-seconds per phase of one call (GTP_ATTENTION_PROFILE)."""
    with tempfile.NamedTemporaryFile("r", suffix=".txt", delete=False) as f:
        path = f.name
    os.environ["GTP_ATTENTION_PROFILE"] = path
    try:
        for _ in range(reps):
            call()
    finally:
        del os.environ["GTP_ATTENTION_PROFILE"]
    with open(path) as f:
        lines = [dict(kv.split("=") for kv in line.split()) for line in f if line.strip()]
    os.remove(path)
    return {p: statistics.median(float(x[p]) for x in lines) for p in PHASES}


def with_env(key, value, fn):
    def call():
        os.environ[key] = value
        try:
            return fn()
        finally:
            del os.environ[key]

    return call


def gemm_floor(b, h, n, d, reps=200):
    """Seconds for the two GEMMs of all B*H tiles at this machine's single-thread MKL rate on
    one in-cache tile (torch.mm, min over repeats), split over the intra-op threads: the time
    the op would take if softmax, threshold and scores were free."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        qt, kt, vt, at = torch.randn(n, d), torch.randn(n, d), torch.randn(n, d), torch.rand(n, n)
        s, o = torch.empty(n, n), torch.empty(n, d)

        def tile():
            torch.mm(qt, kt.t(), out=s)
            torch.mm(at, vt, out=o)

        for _ in range(20):
            tile()
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(reps):
                tile()
            best = min(best, (time.perf_counter() - start) / reps)
    finally:
        torch.set_num_threads(threads)
    return best * b * h / threads


def sdpa_call(q, k, v, scale):
    """SDPA on q, k, v and a description of the kernel it runs. On CUDA in float16 / bfloat16
    it is forced to FlashAttention (an error if that cannot run: the baseline must be what
    it says); elsewhere torch picks."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def flash():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return sdpa(q, k, v, scale=scale)

        return flash, "FlashAttention (SDPBackend.FLASH_ATTENTION)"
    return (lambda: sdpa(q, k, v, scale=scale)), "torch's default SDPA backend"


def bench_shape(b, h, n, d, rounds, theta_sparse, device, dtype, backends, why_not, ceil):
    torch.manual_seed(0)
    q, k, v = timm_qkv(b, h, n, d, device, dtype)
    log_sizes = None  # sizes all 1 at the first block; the log term costs one add per logit
    scale = d**-0.5
    m, score = 1, "mixed_max"
    flops = 8 * n * n * d * b * h
    elt = q.element_size()
    qkvo_bytes = 4 * b * h * n * d * elt
    score_bytes = b * (n - m) * 4

    def run(backend, theta, s=score):
        fn = devices.op_function("attention", backend)
        return lambda: fn(q, k, v, log_sizes, scale, theta, m, s)

    sdpa_fn, sdpa_kind = sdpa_call(q, k, v, scale)
    providers = {SDPA: (sdpa_fn, 1.0, 0)}  # name: (fn, theta, score bytes)
    for backend in backends:
        if backend == "reference":
            continue
        providers[f"{backend} theta 1, score none"] = (run(backend, 1.0, "none"), 1.0, 0)
        providers[f"{backend} theta 1"] = (run(backend, 1.0), 1.0, score_bytes)
        providers[f"{backend} theta {theta_sparse}"] = (
            run(backend, theta_sparse),
            theta_sparse,
            score_bytes,
        )
        if backend == "cpu":
            providers[f"cpu theta {theta_sparse}, nth_element"] = (
                with_env("GTP_ATTENTION_SELECT", "nth_element", run("cpu", theta_sparse)),
                theta_sparse,
                score_bytes,
            )
    providers["reference theta 1"] = (run("reference", 1.0), 1.0, score_bytes)
    providers[f"reference theta {theta_sparse}"] = (
        run("reference", theta_sparse),
        theta_sparse,
        score_bytes,
    )

    # correctness first
    want = {1.0: run("reference", 1.0)(), theta_sparse: run("reference", theta_sparse)()}
    check(SDPA, (sdpa_fn(), torch.empty(0)), want[1.0], dtype)
    for name, (fn, theta, _) in providers.items():
        if not name.startswith(("reference", "sdpa")):
            check(name, fn(), want[theta], dtype)

    fns = {k_: f for k_, (f, _, _) in providers.items()}
    iters = 1
    with torch.inference_mode():
        if device.type == "cuda":
            for fn in fns.values():  # warm-up: compilation, autotuning caches, allocator
                fn()
            iters = {name: calibrate(fn, device) for name, fn in fns.items()}
        times = alternating(fns, rounds=rounds, warmup=1, iters=iters, device=device)
    med = {name: statistics.median(t) for name, t in times.items()}
    base = med[SDPA]
    rows = []
    for name, t in times.items():
        ref_t = med[f"reference theta {providers[name][1]:g}"]
        row = [
            name,
            f"{1e3 * med[name]:.3f}",
            f"{(max(t) - min(t)) / med[name]:.0%}",
            f"{med[name] / base:.2f}x",
            f"{ref_t / med[name]:.1f}x",
        ]
        if device.type == "cuda":
            row += ceil.cells(flops, qkvo_bytes + providers[name][2], med[name])
        else:
            row.append(f"{flops / med[name] / 1e9:.0f}")
        rows.append(row)
    header = ["provider", "ms (median)", "spread", "vs sdpa", "speed-up vs reference"]
    if device.type == "cuda":
        header += ["TFLOP/s (% of peak)", "GB/s (% of peak)"]
    else:
        header.append("GFLOP/s")
    dname = str(dtype).removeprefix("torch.")
    print(
        f"\n### B={b} H={h} N={n} d={d} {dname}, timm qkv strides, score={score}, M={m}, "
        f"{device.type}\n"
    )
    print(f"# sdpa: {sdpa_kind}")
    for line in devices.notes("attention", device, backends, why_not):
        print(line)
    print()
    print(markdown_table(header, rows))
    if device.type == "cpu" and "cpu theta 1" in med:
        t1, ts = med["cpu theta 1"], med[f"cpu theta {theta_sparse}"]
        floor = gemm_floor(b, h, n, d)
        print(
            f"\ncpu theta {theta_sparse} / theta 1: {ts / t1:.2f}x; "
            f"cpu theta 1 / sdpa: {t1 / base:.2f}x.\nFLOP floor {flops / 1e9:.2f} GFLOP "
            f"(4 N^2 d MACs per tile); at the single-thread in-cache torch.mm rate of one tile "
            f"({flops / floor / 1e9:.0f} GFLOP/s over {torch.get_num_threads()} threads) the two "
            f"GEMMs alone take {1e3 * floor:.1f} ms: cpu theta 1 is {t1 / floor:.2f}x that, "
            f"cpu theta {theta_sparse} {ts / floor:.2f}x. (Best case: min over repeats on an "
            "idle core; the providers above are medians on a shared machine. The breakdown "
            "below gives the GEMM share measured inside the op.)"
        )
        brows = []
        for theta in (1.0, theta_sparse):
            ph = breakdown(run("cpu", theta))
            total = sum(ph.values())
            brows.append(
                [f"theta {theta}"]
                + [f"{1e3 * ph[p]:.1f} ({ph[p] / total:.0%})" for p in PHASES]
                + [f"{1e3 * total:.1f}"]
            )
        print("\nTile-phase breakdown, thread-ms per call summed over threads (median of 5):\n")
        print(markdown_table(["call", *PHASES, "total"], brows))
    return med


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=list(devices.DTYPES))
    p.add_argument("--batch", type=int, default=None, help="default: 64 on cpu, 256 on cuda")
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--tokens", type=int, nargs="+", default=[197, 189])
    p.add_argument("--theta", type=float, default=0.6)
    p.add_argument("--rounds", type=int, default=9)
    devices.add_providers_argument(p, " besides sdpa")
    p.add_argument("--ceiling", action="store_true", help="measure the device's ceilings")
    args = p.parse_args()
    alloc = ensure_malloc_env()
    device = torch.device(args.device)
    dtype = devices.DTYPES[args.dtype]
    batch = args.batch or (256 if device.type == "cuda" else 64)
    backends, why_not = devices.providers("attention", device, args.providers)
    ceil = None
    if device.type == "cuda":
        ceil = devices.ceilings(device, dtype, measured=args.ceiling)
    print(
        f"# gtp.attention benchmark: {devices.describe(device)}. Timings on a shared machine "
        f"are noisy: medians of {args.rounds} interleaved rounds; compare ratios within one "
        f"run. Allocator: {alloc}.",
        file=sys.stdout,
    )
    if ceil is not None:
        print(f"# ceilings: {ceil.source}")
    for n in args.tokens:
        bench_shape(
            batch, args.heads, n, args.dim, args.rounds, args.theta, device, dtype, backends,
            why_not, ceil,
        )  # fmt: skip


if __name__ == "__main__":
    main()
