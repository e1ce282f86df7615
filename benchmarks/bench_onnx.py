"""ONNX Runtime (CPU) throughput of a GTP-patched timm ViT against the unpatched model, both
exported the same way (gtp_kernels.export.to_onnx: dynamic batch, opset 20, ORT's default
graph optimisations).

    python benchmarks/bench_onnx.py                          # DeiT-S, batch 16, theta 0.6 and 1
    python benchmarks/bench_onnx.py --threshold smallest largest

Every session lives in one process and is timed alternately after warm-up (medians of rounds).
Before timing, each session's logits are checked against the eager PyTorch model. The qkv
weights are scaled (--qkv-scale, default 4) so the random model's attention is peaked like a
trained one's. The allocator is put in a steady state first (timing.ensure_malloc_env).
--threshold exports one patched session per way of finding the attention threshold
(gtp_kernels.export.onnx.attention.THRESHOLD_METHODS); their outputs are identical.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

from gtp_kernels.benchmark import models, timing


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    models.add_model_arguments(p, batch=16)
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.6, 1.0], help="theta value(s)")
    p.add_argument("--threshold", nargs="+", default=["auto"], help="threshold method(s)")
    p.add_argument("--qkv-scale", type=float, default=4.0, help="scale of the qkv weights")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--keep", default=None, help="write the .onnx files to this folder")
    return p.parse_args(argv)


def _session(path: str, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def main(argv=None) -> None:
    args = _parse(argv)
    alloc = timing.ensure_malloc_env(not args.no_malloc_env)

    import onnxruntime as ort

    import gtp_kernels.export as gx
    from gtp_kernels.cost import gmacs
    from gtp_kernels.export.onnx.attention import set_threshold_method

    base, x = models.model_and_input(args)
    with torch.no_grad():
        for blk in base.blocks:
            blk.attn.qkv.weight.mul_(args.qkv_scale)
    threads = args.threads or torch.get_num_threads()
    folder = args.keep or tempfile.mkdtemp(prefix="gtp_onnx_")
    os.makedirs(folder, exist_ok=True)

    eager: dict[str, torch.nn.Module] = {"timm (unpatched)": base}
    methods: dict[str, str | None] = {"timm (unpatched)": None}
    for theta in args.sparsity:
        for method in args.threshold if theta < 1 else ["auto"]:
            several = len(args.threshold) > 1 and theta < 1
            name = f"gtp, theta={theta:g}" + (f", {method}" if several else "")
            eager[name] = models.patched_copy(base, args, theta, "cpu")
            methods[name] = method if theta < 1 else None

    print(
        f"# {args.model}, batch {args.batch}, input {tuple(x.shape[1:])}, float32, "
        f"P={args.num_prop}, alpha={args.alpha:g}, K={args.neighbours}, "
        f"qkv x{args.qkv_scale:g}"
    )
    machine = timing.machine_description()
    print(
        f"# {machine['cpu']}, onnxruntime {ort.__version__} CPU, {threads} intra-op threads, "
        f"torch {machine['torch']}, opset {gx.OPSET}, git {machine['git']}"
    )
    print(f"# allocator: {alloc}")

    sessions = {}
    for i, (name, model) in enumerate(eager.items()):
        if methods[name] is not None:
            set_threshold_method(methods[name])
        path = os.path.join(folder, f"variant{i}.onnx")
        print(f"# exporting {name} -> {path}", file=sys.stderr, flush=True)
        gx.to_onnx(model, path, x[:2], verbose=False)
        sessions[name] = _session(path, threads)
    set_threshold_method("auto")

    feed = {"images": x.numpy()}
    with torch.inference_mode():
        for name, model in eager.items():
            got = torch.from_numpy(sessions[name].run(None, {"images": x[:4].numpy()})[0])
            ref = model(x[:4])
            err = ((got - ref).abs().max() / ref.abs().max()).item()
            print(f"# check: {name} ORT vs eager: max |logit diff| / max |logit| {err:.1e}")
            if err > 1e-3:
                raise SystemExit(f"{name}: the ONNX Runtime session disagrees with eager")

    fns = {name: (lambda s=s: s.run(None, feed)) for name, s in sessions.items()}
    print(
        f"# timing {len(fns)} sessions alternately, {args.rounds} rounds after {args.warmup} "
        "warm-up",
        file=sys.stderr,
    )
    times = timing.alternating(fns, rounds=args.rounds, warmup=args.warmup)

    base_t = timing.median(times["timm (unpatched)"])
    base_g = gmacs(base)
    rows = []
    for name, model in eager.items():
        rows.append(
            [name, *timing.speedup_row(times[name], base_t, gmacs(model), base_g, args.batch)]
        )
    header = ["ORT session", *timing.SPEEDUP_HEADER]
    print(timing.markdown_table(header, rows))


if __name__ == "__main__":
    main()
