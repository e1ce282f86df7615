"""Benchmark propagate: the compiled CPU / CUDA kernels and Triton vs the reference and vs a
plain copy of the kept rows.

Defaults: B=64 (256 with --device cuda), N=197 (CLS + 14 x 14), C=384, P=8, K=8 (W=16),
float32, with token sizes: one propagation step of deit_small_patch16_224. The graph is a
realistic mixed graph made here (the spatial 8-neighbourhood plus 8 random distinct other
tokens per row, ascending, weights 1/sqrt(d_i d_j)); the P propagated tokens are random per
image. Providers: every backend that runs here (reference, cpu or cuda, triton; --providers
picks a subset, a backend that cannot run is listed with the reason), each checked against
the reference before timing. On CUDA each timing is CUDA events around enough calls to last
~20 ms, after warm-up.

Goals: the compiled kernels >= 10x faster than the reference, and at most 2x the time of
`x.index_select(1, rows)`, the copy of the kept rows (the memory-speed floor of pruning); on a
GPU within 1.2x of the byte floor below.

Byte model (the floor, per call): read x once (B*N*C elements: the kept rows and the
propagated rows they absorb), write the B*(N-P)*C output elements; the graph rows of the kept
tokens read and written (B*(n-P)*W*(4 + 4) bytes each way), keep (B*(n-P)*8 bytes), sizes
read and written (B*N*4 + B*(N-P)*4). index_select moves B*(N-P)*C elements each way.
GB/s below are those bytes / median time (on CPU, the copy ceiling with --ceiling; on CUDA
the share of the device's bandwidth: datasheet, or measured with --ceiling).

On a small machine shared with other jobs, --threads 1 shows the kernel itself: with 2
OpenMP threads every call's join waits for a descheduled thread and spinning workers
compete with the main thread (OMP_WAIT_POLICY=passive recovers part of that), while
index_select is not affected in the same way.

    PYTHONPATH=. python benchmarks/bench_propagate.py [--threads 1] [--dtype float32]
        [--no-sizes] [--ceiling]
    PYTHONPATH=. python benchmarks/bench_propagate.py --device cuda --dtype float16 \
        --channels 768                                                      # DeiT-B
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from gtp_kernels.benchmark import devices, timing


def mixed_graph(b: int, h: int, w: int, k: int, gen: torch.Generator):
    """index (B, n, 8 + K) int32 and weight float32: spatial 8-neighbours on the h x w grid
    OR K random distinct semantic neighbours j != i, ascending, -1 padded."""
    n = h * w
    t = torch.arange(n)
    row, col = t // w, t % w
    spatial = ((row[:, None] - row[None]).abs() <= 1) & ((col[:, None] - col[None]).abs() <= 1)
    spatial &= ~torch.eye(n, dtype=torch.bool)
    scores = torch.rand(b, n, n, generator=gen)
    scores.diagonal(dim1=1, dim2=2).fill_(-1.0)
    semantic = torch.zeros(b, n, n, dtype=torch.bool)
    semantic.scatter_(2, scores.topk(k, dim=-1).indices, True)
    adj = spatial | semantic
    deg = adj.sum(-1).float()
    width = 8 + k
    cols = torch.where(adj, t, n).sort(dim=-1).values[..., :width]
    index = torch.where(cols < n, cols, -1).to(torch.int32)
    j = cols.clamp(max=n - 1)
    weight = (deg[..., None] * deg.gather(1, j.flatten(1)).view_as(j)).rsqrt()
    weight = torch.where(cols < n, weight, 0.0)
    return index, weight


def _check(name, out, ref, dtype):
    tol = {torch.float32: 1e-5, torch.float64: 1e-10}.get(dtype, 2e-2)
    torch.testing.assert_close(out[0], ref[0], atol=tol, rtol=tol, msg=f"{name}: x_out")
    torch.testing.assert_close(out[1], ref[1], atol=1e-5, rtol=1e-5, msg=f"{name}: sizes_out")
    if not (torch.equal(out[2], ref[2]) and torch.equal(out[3], ref[3])):
        raise SystemExit(f"{name}: graph differs from the reference; not timing it")


COPY = "index_select (copy floor)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=None, help="default: 64 on cpu, 256 on cuda")
    p.add_argument("--grid", type=int, default=14, help="image tokens on a grid x grid")
    p.add_argument("--prefix", type=int, default=1)
    p.add_argument("--channels", type=int, default=384)
    p.add_argument("--num-prop", type=int, default=8)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--dtype", default="float32", choices=list(devices.DTYPES))
    p.add_argument("--no-sizes", action="store_true")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    devices.add_providers_argument(p)
    p.add_argument("--ceiling", action="store_true", help="measure the copy bandwidth too")
    args = p.parse_args()
    alloc = timing.ensure_malloc_env()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = devices.DTYPES[args.dtype]
    b = args.batch or (256 if cuda else 64)
    m, c, big_p = args.prefix, args.channels, args.num_prop
    n = args.grid * args.grid
    big_n = m + n
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, big_n, c, generator=gen).to(dtype)
    index, weight = mixed_graph(b, args.grid, args.grid, args.k, gen)
    width = index.shape[2]
    keep = torch.stack([torch.randperm(n, generator=gen)[big_p:].sort().values for _ in range(b)])
    sizes = None if args.no_sizes else torch.ones(b, big_n)
    x, index, weight, keep = (t.to(device) for t in (x, index, weight, keep))
    sizes = None if sizes is None else sizes.to(device)
    op_args = (x, index, weight, keep, args.alpha, m, sizes)
    rows = torch.cat([torch.arange(m), keep[0].cpu() + m]).to(device)  # one image's kept rows

    backends, why_not = devices.providers("propagate", device, args.providers)
    fns = {}
    for backend in backends:
        fn = devices.op_function("propagate", backend)
        fns[backend] = lambda fn=fn: fn(*op_args)
    fns[COPY] = lambda: x.index_select(1, rows)
    ref = fns["reference"]()
    for name in backends:
        if name != "reference":
            _check(name, fns[name](), ref, dtype)

    # Calls per timing: on a GPU enough to last ~20 ms (CUDA events, after warm-up); on the
    # CPU a few repeats so that one timing of a fast provider is not a few microseconds.
    if cuda:
        for fn in fns.values():
            fn()
        iters = {k: timing.calibrate(fn, device) for k, fn in fns.items()}
    else:
        iters = {"reference": 1, "cpu": 10, COPY: 10}
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for r in range(args.rounds):
        for k, fn in fns.items():
            times[k].append(timing.time_call(fn, iters.get(k, 1), device))
        done = ", ".join(f"{k} {1e3 * statistics.median(t):.2f} ms" for k, t in times.items())
        print(f"  round {r + 1}/{args.rounds}: {done}", file=sys.stderr, flush=True)

    elt = x.element_size()
    kept_rows = n - big_p
    graph_bytes = 2 * b * kept_rows * width * 8 + b * kept_rows * 8
    sizes_bytes = 0 if sizes is None else b * big_n * 4 + b * (big_n - big_p) * 4
    op_bytes = b * big_n * c * elt + b * (big_n - big_p) * c * elt + graph_bytes + sizes_bytes
    floor = {k: op_bytes for k in backends}
    floor[COPY] = 2 * b * (big_n - big_p) * c * elt
    med = {k: timing.median(v) for k, v in times.items()}
    t_ref = med["reference"]
    t_copy = med[COPY]
    ceil = devices.ceilings(device, dtype, measured=args.ceiling) if cuda else None
    table = []
    for k in fns:
        gbps = floor[k] / med[k] / 1e9
        table.append(
            [
                k,
                f"{1e3 * med[k]:.3f}",
                f"{timing.spread(times[k]):.0%}",
                f"{t_ref / med[k]:.1f}x",
                f"{med[k] / t_copy:.2f}",
                f"{gbps:.0f} ({gbps / ceil.gbps:.0%})" if cuda else f"{gbps:.1f}",
            ]
        )
    where = devices.describe(device) if cuda else f"{torch.get_num_threads()} threads"
    print(
        f"# propagate B={b} N={big_n} (prefix {m}) C={c} P={big_p} W={width} alpha={args.alpha} "
        f"{args.dtype} sizes={'no' if sizes is None else 'yes'}; {where}, torch "
        f"{torch.__version__}; {alloc}"
    )
    print(f"# byte model: {op_bytes / 1e6:.1f} MB per call (copy floor {floor[COPY] / 1e6:.1f} MB)")
    if ceil is not None:
        print(f"# ceilings: {ceil.source}")
    for line in devices.notes("propagate", device, backends, why_not):
        print(line)
    print(
        timing.markdown_table(
            [
                "provider",
                "median ms",
                "spread",
                "speed-up vs reference",
                "time / copy",
                "GB/s (% of peak)" if cuda else "GB/s",
            ],
            table,
        )
    )
    if args.ceiling and not cuda:
        # As benchmarks/ceiling.py: a 256 MiB float32 copy, read + write bytes.
        src = torch.randn(64 << 20)
        dst = torch.empty_like(src)
        t = timing.median(
            timing.alternating({"copy": lambda: dst.copy_(src)}, 5, 1, 1, False)["copy"]
        )
        print(f"# copy ceiling: {2 * src.numel() * 4 / t / 1e9:.1f} GB/s (256 MiB, read + write)")


if __name__ == "__main__":
    main()
