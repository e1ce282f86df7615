"""Benchmark build_graph and select_tokens: the compiled CPU / CUDA kernels and Triton vs the
reference, and build_graph's cost as a share of one forward of the unpatched timm model it is
built for.

Defaults: B=64 (256 with --device cuda), 14 x 14 tokens (n=196), C=384, K=8, mixed graph,
float32, i.e. the graph of a deit_small_patch16_224 batch. Goal: build_graph <= 1% of that
model's forward. Providers: every backend that runs here (reference, cpu or cuda, triton;
--providers picks a subset, a backend that cannot run is listed with the reason), each checked
against the reference before timing. On CUDA each timing is CUDA events around enough calls to
last ~20 ms, after warm-up, and the model runs on the GPU in --dtype.

Floors (per call): the similarity GEMM is B*n*n*C MACs (2*B*n*n*C FLOP) and reading the tokens
is B*n*C*(element size) bytes; the graph written is B*n*W*(4 + 4) bytes. The derived rates
below use those counts, next to the machine's ceilings (benchmarks/ceiling.py) with --ceiling
on CPU; on CUDA as a share of the device's peaks (datasheet, or measured with --ceiling).

    python benchmarks/bench_build_graph.py [--no-model] [--ceiling] [--rounds 7]
    python benchmarks/bench_build_graph.py --device cuda --dtype float16 --channels 768 \
        --model deit_base_patch16_224                                       # DeiT-B
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from gtp_kernels.benchmark import devices, timing


def _check_select(name, out, ref):
    for a, b, what in zip(out, ref, ("keep", "prop"), strict=True):
        if not torch.equal(a, b):
            raise SystemExit(f"{name}: {what} differs from the reference; not timing it")


def _check_graph(name, out, ref):
    """The graph against the reference's. The similarity GEMM rounds differently on another
    backend (or in another summation order), so a near-tie at the K-th neighbour can resolve
    the other way: a tiny fraction of rows may differ, and a different neighbour changes the
    degrees, hence the weights, of the rows around it. Returns the share of identical rows."""
    index, weight = out
    ref_index, ref_weight = ref
    same_rows = (index == ref_index).all(-1)
    close_rows = torch.isclose(weight, ref_weight, rtol=1e-6, atol=1e-7).all(-1)
    same, close = same_rows.float().mean().item(), close_rows.float().mean().item()
    if same < 0.999 or close < 0.99:
        raise SystemExit(
            f"{name}: index rows identical to the reference {same:.3%}, weight rows close "
            f"{close:.3%}; not timing it"
        )
    return same


def _rounds(fns, rounds, iters, device):
    """Interleaved rounds: fn -> list of seconds per call. iters: calls per timing per fn."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for r in range(rounds):
        for k, fn in fns.items():
            times[k].append(timing.time_call(fn, iters.get(k, 1), device))
        done = ", ".join(f"{k} {1e3 * statistics.median(t):.2f} ms" for k, t in times.items())
        print(f"  round {r + 1}/{rounds}: {done}", file=sys.stderr, flush=True)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=list(devices.DTYPES), help="tokens")
    p.add_argument("--batch", type=int, default=None, help="default: 64 on cpu, 256 on cuda")
    p.add_argument("--height", type=int, default=14)
    p.add_argument("--width", type=int, default=14)
    p.add_argument("--channels", type=int, default=384)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--graph", default="mixed", choices=["spatial", "semantic", "mixed"])
    p.add_argument("--num-prop", type=int, default=8, help="P for select_tokens")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--no-model", action="store_true", help="skip the timm forward")
    devices.add_providers_argument(p)
    p.add_argument("--ceiling", action="store_true", help="measure copy/GEMM ceilings too")
    args = p.parse_args()
    alloc = timing.ensure_malloc_env()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = devices.DTYPES[args.dtype]

    B, h, w, C, K = (
        args.batch or (256 if cuda else 64),
        args.height,
        args.width,
        args.channels,
        args.k,
    )
    n = h * w
    W = {"spatial": 8, "semantic": K, "mixed": 8 + K}[args.graph]
    tokens = torch.randn(B, n, C).to(device, dtype)
    score = torch.randn(B, n).to(device)
    graph_args = (tokens, h, w, K, args.graph)

    graph_backends, graph_why = devices.providers("build_graph", device, args.providers)
    select_backends, select_why = devices.providers("select_tokens", device, args.providers)
    graph_fns, select_fns = {}, {}
    for backend in graph_backends:
        fn = devices.op_function("build_graph", backend)
        graph_fns[backend] = lambda fn=fn: fn(*graph_args)
    for backend in select_backends:
        fn = devices.op_function("select_tokens", backend)
        select_fns[backend] = lambda fn=fn: fn(score, args.num_prop)
    ref_graph = graph_fns["reference"]()
    ref_sel = select_fns["reference"]()
    identical = {}
    for name, fn in graph_fns.items():
        identical[name] = _check_graph(f"build_graph[{name}]", fn(), ref_graph)
    for name, fn in select_fns.items():
        _check_select(f"select_tokens[{name}]", fn(), ref_sel)

    fns = {f"graph:{k}": v for k, v in graph_fns.items()}
    fns.update({f"select:{k}": v for k, v in select_fns.items()})
    if cuda:  # enough calls per timing to last ~20 ms (CUDA events), after warm-up
        for fn in fns.values():
            fn()
        iters = {k: timing.calibrate(fn, device) for k, fn in fns.items()}
    else:
        iters = {"graph:reference": 2, "graph:cpu": 10, "select:reference": 50, "select:cpu": 200}
    if not args.no_model:
        import timm

        model = timm.create_model(args.model, pretrained=False).eval().to(device, dtype)
        img = torch.randn(B, 3, 224, 224).to(device, dtype)
        fns["model"] = lambda: model(img)
    with torch.inference_mode():
        times = _rounds(fns, args.rounds, iters, device)
    med = {k: timing.median(v) for k, v in times.items()}

    ceil = devices.ceilings(device, dtype, measured=args.ceiling) if cuda else None
    if cuda:
        print(f"# build_graph / select_tokens, {devices.describe(device)}, {alloc}")
        print(f"# ceilings: {ceil.source}")
    else:
        desc = timing.machine_description()
        print(
            f"# build_graph / select_tokens, {desc['cpu']}, {desc['threads']} threads, "
            f"torch {desc['torch']}, git {desc['git']}, {alloc}"
        )
    print(
        f"# tokens ({B}, {n}, {C}) {args.dtype}, {h}x{w} grid, K={K}, graph={args.graph}, W={W}; "
        f"select: score ({B}, {n}), P={args.num_prop}; {args.rounds} rounds, medians"
    )
    for line in devices.notes("build_graph", device, graph_backends, graph_why):
        print(line)
    for line in devices.notes("select_tokens", device, select_backends, select_why):
        print(line)
    for name, same in identical.items():
        if same < 1.0:
            print(f"# build_graph {name}: {same:.3%} of index rows identical to the reference")
    flop = 2 * B * n * n * C if args.graph != "spatial" else 0
    graph_bytes = B * n * C * tokens.element_size() + B * n * W * 8
    model_t = med.get("model")

    def share(key, digits):
        if not model_t:
            return "-"
        best = min(times[key]) / min(times["model"])
        return f"{100 * med[key] / model_t:.{digits}f}% / {100 * best:.{digits}f}%"

    def rates(flop, nbytes, t):
        if cuda:
            cells = ceil.cells(flop, nbytes, t)
            return [cells[0] if flop else "-", cells[1]]
        return [f"{flop / t / 1e9:.1f}" if flop else "-", f"{nbytes / t / 1e9:.2f}"]

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
                *rates(flop, graph_bytes, t),
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
                *rates(0, sel_bytes, t),
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
    unit = "TFLOP/s (% of peak)" if cuda else "GFLOP/s"
    print(
        timing.markdown_table(
            [
                "op",
                "median ms",
                "best ms",
                "spread",
                "speed-up vs reference",
                f"{unit} (GEMM floor)",
                "GB/s (tokens in + graph out)" + (" (% of peak)" if cuda else ""),
                "share of model forward (medians / bests)",
            ],
            rows,
        )
    )
    print(
        f"\nfloor: GEMM {B}*{n}^2*{C} = {flop / 2e6:.0f} MMAC = {flop / 1e9:.2f} GFLOP; "
        f"tokens {B * n * C * tokens.element_size() / 1e6:.1f} MB read, graph "
        f"{B * n * W * 8 / 1e6:.2f} MB written"
    )
    if args.ceiling and not cuda:
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
