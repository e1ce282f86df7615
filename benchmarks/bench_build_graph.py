"""Benchmark build_graph and select_tokens: the CPU kernels vs the reference, and build_graph's
cost as a share of one forward of the unpatched timm model it is built for.

Defaults: B=64, 14 x 14 tokens (n=196), C=384, K=8, mixed graph, float32, i.e. the graph of a
deit_small_patch16_224 batch of 64. Goal: build_graph <= 1% of that model's forward.

Floors (per call): the similarity GEMM is B*n*n*C MACs (2*B*n*n*C FLOP) and reading the tokens
is B*n*C*4 bytes; the graph written is B*n*W*(4 + 4) bytes. The derived GFLOP/s and GB/s below
use those counts, next to the machine's ceilings (benchmarks/ceiling.py) with --ceiling.

    python benchmarks/bench_build_graph.py [--no-model] [--ceiling] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from gtp_kernels import reference
from gtp_kernels._extension import has_kernel
from gtp_kernels.benchmark import timing


def _check(name, out, ref):
    for a, b, what in zip(out, ref, ("index/keep", "weight/prop"), strict=True):
        if not torch.equal(a, b):
            raise SystemExit(f"{name}: {what} differs from the reference; not timing it")


def _rounds(fns, rounds, iters):
    """Interleaved rounds: fn -> list of seconds per call. iters: calls per timing per fn."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for r in range(rounds):
        for k, fn in fns.items():
            times[k].append(timing.time_call(fn, iters.get(k, 1)))
        done = ", ".join(f"{k} {1e3 * statistics.median(t):.2f} ms" for k, t in times.items())
        print(f"  round {r + 1}/{rounds}: {done}", file=sys.stderr, flush=True)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--height", type=int, default=14)
    p.add_argument("--width", type=int, default=14)
    p.add_argument("--channels", type=int, default=384)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--graph", default="mixed", choices=["spatial", "semantic", "mixed"])
    p.add_argument("--num-prop", type=int, default=8, help="P for select_tokens")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--no-model", action="store_true", help="skip the timm forward")
    p.add_argument("--ceiling", action="store_true", help="measure copy/GEMM ceilings too")
    args = p.parse_args()
    alloc = timing.ensure_malloc_env()

    B, h, w, C, K = args.batch, args.height, args.width, args.channels, args.k
    n = h * w
    W = {"spatial": 8, "semantic": K, "mixed": 8 + K}[args.graph]
    tokens = torch.randn(B, n, C)
    score = torch.randn(B, n)
    graph_args = (tokens, h, w, K, args.graph)

    graph_fns = {"reference": lambda: reference.build_graph(*graph_args)}
    select_fns = {"reference": lambda: reference.select_tokens(score, args.num_prop)}
    if has_kernel("build_graph", "CPU"):
        graph_fns["cpu"] = lambda: torch.ops.gtp.build_graph(*graph_args)
    if has_kernel("select_tokens", "CPU"):
        select_fns["cpu"] = lambda: torch.ops.gtp.select_tokens(score, args.num_prop)
    ref_graph = graph_fns["reference"]()
    ref_sel = select_fns["reference"]()
    for name, fn in graph_fns.items():
        _check(f"build_graph[{name}]", fn(), ref_graph)
    for name, fn in select_fns.items():
        _check(f"select_tokens[{name}]", fn(), ref_sel)

    fns = {f"graph:{k}": v for k, v in graph_fns.items()}
    fns.update({f"select:{k}": v for k, v in select_fns.items()})
    iters = {"graph:reference": 2, "graph:cpu": 10, "select:reference": 50, "select:cpu": 200}
    if not args.no_model:
        import timm

        model = timm.create_model(args.model, pretrained=False).eval()
        img = torch.randn(B, 3, 224, 224)
        fns["model"] = lambda: model(img)
    with torch.inference_mode():
        times = _rounds(fns, args.rounds, iters)
    med = {k: timing.median(v) for k, v in times.items()}

    desc = timing.machine_description()
    print(
        f"# build_graph / select_tokens, {desc['cpu']}, {desc['threads']} threads, "
        f"torch {desc['torch']}, git {desc['git']}, {alloc}"
    )
    print(
        f"# tokens ({B}, {n}, {C}) float32, {h}x{w} grid, K={K}, graph={args.graph}, W={W}; "
        f"select: score ({B}, {n}), P={args.num_prop}; {args.rounds} rounds, medians"
    )
    flop = 2 * B * n * n * C if args.graph != "spatial" else 0
    graph_bytes = B * n * C * 4 + B * n * W * 8
    model_t = med.get("model")

    def share(key, digits):
        if not model_t:
            return "-"
        best = min(times[key]) / min(times["model"])
        return f"{100 * med[key] / model_t:.{digits}f}% / {100 * best:.{digits}f}%"

    rows = []
    for name in graph_fns:
        t = med[f"graph:{name}"]
        rows.append(
            [
                f"build_graph {name}",
                f"{1e3 * t:.2f}",
                f"{1e3 * min(times[f'graph:{name}']):.2f}",
                f"{timing.spread(times[f'graph:{name}']):.0%}",
                f"{med['graph:reference'] / t:.1f}x",
                f"{flop / t / 1e9:.1f}" if flop else "-",
                f"{graph_bytes / t / 1e9:.2f}",
                share(f"graph:{name}", 2),
            ]
        )
    sel_bytes = B * n * 4 + B * n * 8
    for name in select_fns:
        t = med[f"select:{name}"]
        rows.append(
            [
                f"select_tokens {name}",
                f"{1e3 * t:.3f}",
                f"{1e3 * min(times[f'select:{name}']):.3f}",
                f"{timing.spread(times[f'select:{name}']):.0%}",
                f"{med['select:reference'] / t:.1f}x",
                "-",
                f"{sel_bytes / t / 1e9:.2f}",
                share(f"select:{name}", 3),
            ]
        )
    if model_t:
        rows.append(
            [
                f"{args.model} forward (B={B})",
                f"{1e3 * model_t:.0f}",
                f"{1e3 * min(times['model']):.0f}",
                f"{timing.spread(times['model']):.0%}",
                "-",
                "-",
                "-",
                "100%",
            ]
        )
    print(
        timing.markdown_table(
            [
                "op",
                "median ms",
                "best ms",
                "spread",
                "speed-up vs reference",
                "GFLOP/s (GEMM floor)",
                "GB/s (tokens in + graph out)",
                "share of model forward (medians / bests)",
            ],
            rows,
        )
    )
    print(
        f"\nfloor: GEMM {B}*{n}^2*{C} = {flop / 2e6:.0f} MMAC = {flop / 1e9:.2f} GFLOP; "
        f"tokens {B * n * C * 4 / 1e6:.1f} MB read, graph {B * n * W * 8 / 1e6:.2f} MB written"
    )
    if args.ceiling:
        sys.path.insert(0, __import__("os").path.dirname(__file__))
        from ceiling import measure

        c = measure()
        print(
            f"ceilings: copy {c['copy_GBps']:.1f} GB/s, float32 GEMM 2048^3 "
            f"{c['gemm_GFLOPs']:.0f} GFLOP/s -> GEMM floor of build_graph "
            f"{1e3 * flop / (c['gemm_GFLOPs'] * 1e9):.2f} ms, read floor "
            f"{1e3 * B * n * C * 4 / (c['copy_GBps'] / 2 * 1e9):.2f} ms"
        )


if __name__ == "__main__":
    main()
