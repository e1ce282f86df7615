"""End-to-end throughput of a GTP-patched timm ViT against the unpatched model.

    gtp-bench                                   # DeiT-S, batch 64, P=8, theta=0.6, alpha=0.1
    python benchmarks/bench_timm.py --model deit_base_patch16_224 --batch 16 --sparsity 0.6 1.0
    python benchmarks/bench_timm.py --device cuda --dtype float16 --batch 256

Every variant lives in one process and is timed alternately (unpatched, patched-reference,
patched-cpu, ...) after warm-up; the table gives medians over rounds. Before timing, every
patched backend is checked against the patched reference backend. The allocator is put in a
steady state first (see gtp_kernels.benchmark.timing.ensure_malloc_env).

On CUDA (--device cuda) the unpatched model is timm's own (its attention is PyTorch SDPA, i.e.
FlashAttention in float16 / bfloat16), the patched backends are reference, cuda (when this
build has CUDA kernels) and triton (when gtp_kernels.triton has every op); each timing is one
forward between CUDA events, after warm-up.
"""

from __future__ import annotations

import argparse
import csv
import sys

import torch

from gtp_kernels.benchmark import models, timing


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    models.add_model_arguments(p, batch=64)
    models.add_device_arguments(p)
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.6], help="theta value(s)")
    p.add_argument(
        "--backends",
        nargs="+",
        default=None,
        help="patched backends to time (default: reference and every backend with a kernel for "
        "every op on the device; triton on CPU tensors needs the interpreter, so only when asked)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time torch.compile of the patched model for every non-reference backend",
    )
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--csv", default=None, help="append the rows to this CSV file")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = _parse(argv)
    alloc = timing.ensure_malloc_env(not args.no_malloc_env)

    from gtp_kernels.cost import gmacs

    base, x = models.model_and_input(args)
    device = x.device
    backends = args.backends or models.default_backends(device)

    variants: dict[str, torch.nn.Module] = {"timm (unpatched)": base}
    for theta in args.sparsity:
        for backend in backends:
            model = models.patched_copy(base, args, theta, backend)
            variants[f"gtp {backend}, theta={theta:g}"] = model
            if args.compile and backend != "reference":
                variants[f"gtp {backend}+compile, theta={theta:g}"] = torch.compile(
                    model, fullgraph=True
                )

    print(
        f"# {args.model}, batch {args.batch}, input {tuple(x.shape[1:])}, {args.dtype}, "
        f"P={args.num_prop}, alpha={args.alpha:g}, K={args.neighbours}"
    )
    machine = timing.machine_description()
    if device.type == "cuda":
        from gtp_kernels.benchmark.devices import describe

        print(f"# {describe(device)}")
    else:
        print(
            f"# {machine['cpu']}, {machine['threads']} threads, torch {machine['torch']}, "
            f"git {machine['git']}"
        )
    print(f"# allocator: {alloc}")
    if not args.backends:
        for backend, why in models.missing_backends(device).items():
            print(f"# backend {backend} not timed: {why}")

    with torch.inference_mode():
        outputs = {name: m(x[:4]) for name, m in variants.items()}
        out_dtype = x.dtype
        for name, out in outputs.items():
            if name.startswith("gtp") and "reference" not in name:
                theta = name.split("theta=")[1]
                ref = outputs.get(f"gtp reference, theta={theta}")
                if ref is not None:
                    # Relative to the largest logit. A broken backend is off by O(1); a correct
                    # one by float rounding, plus, for theta < 1, the attention entries within
                    # rounding of the threshold tau that one side masks and the other keeps
                    # (each moves an output row by ~1/N of a value row). A random-initialised
                    # model's near-uniform attention has many such entries: 8e-4 measured.
                    out, ref = out.float(), ref.float()
                    err = ((out - ref).abs().max() / ref.abs().max()).item()
                    print(
                        f"# check: {name} vs reference backend: max |logit diff| / max |logit| "
                        f"{err:.1e}"
                    )
                    # In float16 / bfloat16 the scores round differently too, so a token
                    # at the selection boundary can flip: 1.3e-2 measured on an H200 (DeiT-B,
                    # fp16, batch 256, the cuda backend against the reference).
                    if err > (1e-2 if out_dtype == torch.float32 else 5e-2):
                        raise SystemExit(f"{name} disagrees with the reference backend")
        fns = {name: (lambda m=m: m(x)) for name, m in variants.items()}
        print(
            f"# timing {len(fns)} variants alternately, {args.rounds} rounds after "
            f"{args.warmup} warm-up",
            file=sys.stderr,
        )
        times = timing.alternating(fns, rounds=args.rounds, warmup=args.warmup, device=device)

    base_t = timing.median(times["timm (unpatched)"])
    base_g = gmacs(base)
    rows = []
    for name, m in variants.items():
        g = gmacs(getattr(m, "_orig_mod", m))
        rows.append([name, *timing.speedup_row(times[name], base_t, g, base_g, args.batch)])
    header = ["variant", *timing.SPEEDUP_HEADER]
    print(timing.markdown_table(header, rows))
    if args.csv:
        with open(args.csv, "a", newline="") as f:
            w = csv.writer(f)
            for row in rows:
                w.writerow([*machine.values(), args.model, args.batch, *row])


if __name__ == "__main__":
    main()
