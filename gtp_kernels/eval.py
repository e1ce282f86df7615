"""gtp-eval: ImageNet-style top-1 / top-5 of a timm ViT with and without GTP, shaped like timm's
validate.py, one row per combination of GTP settings (the unpatched model is always a row).

    gtp-eval /data/imagenet/val -m deit_small_patch16_224 --pretrained \\
        --num-prop 0 8 --sparsity 1 0.6 --results-file results.csv
    torchrun --nproc-per-node 8 -m gtp_kernels.eval /data/imagenet/val -m deit_small_patch16_224
    gtp-eval /data/val -m deit_base_patch16_224 --gmacs-reduction 0.1 0.2 0.26 0.3

Data: an ImageFolder tree (DIR/<class>/<image>), or anything timm.data.create_dataset reads
(--dataset, --split; with the default split "validation" a DIR/val or DIR/validation folder is
found by itself). Preprocessing comes from the model's pretrained config (resize, center crop,
interpolation, mean / std; --img-size, --crop-pct, --interpolation, --mean, --std override it).

Every batch is loaded once and run through every setting. Under torchrun (or any launcher
that sets RANK / WORLD_SIZE) each process takes every WORLD_SIZE-th image, without the padding
duplicates of DistributedSampler, and the correct-prediction counts are summed (NCCL on GPUs,
gloo on CPUs): the counts are exact. Only rank 0 prints and writes results.

images_per_sec is the model alone, without data loading: after the evaluation rank 0 times
every setting on a random batch of the evaluation's batch size and input size, alternately
(gtp_kernels.benchmark.timing: warm-up, then medians over rounds), as gtp-bench does.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import json
import os
import sys
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch

from gtp_kernels import _cli

PROG = "gtp-eval"
COLUMNS = (
    "model", "top1", "top1_err", "top5", "top5_err", "param_count", "img_size", "crop_pct",
    "interpolation", "num_prop", "sparsity", "alpha", "num_neighbours", "graph", "selection",
    "propagation", "backend", "gmacs_reduction", "gmacs", "images_per_sec", "num_images",
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("data", metavar="DIR", help="dataset root (an ImageFolder tree)")
    p.add_argument("--dataset", default="", help="timm dataset type/name (default: folder)")
    p.add_argument("--split", default="validation", help="dataset split (default: validation)")
    p.add_argument("--class-map", default="", help="class name -> index file")
    p.add_argument(
        "--num-samples",
        type=int,
        default=None,
        metavar="N",
        help="evaluate N images only: every (len / N)-th image, so every class is sampled",
    )
    _cli.add_model_arguments(p)
    _cli.add_preprocessing_arguments(p)
    g = p.add_argument_group("run")
    g.add_argument("-b", "--batch-size", type=int, default=256, metavar="N")
    g.add_argument("-j", "--workers", type=int, default=4, metavar="N", help="loader workers")
    g.add_argument("--amp", action="store_true", help="mixed precision (torch.autocast)")
    g.add_argument("--amp-dtype", default="float16", choices=("float16", "bfloat16"))
    g.add_argument("--channels-last", action="store_true")
    g.add_argument(
        "--torchcompile",
        nargs="?",
        const="inductor",
        default=None,
        metavar="BACKEND",
        help="torch.compile the model (default backend: inductor)",
    )
    g.add_argument("--results-file", default="", metavar="FILE", help="write the rows here")
    g.add_argument("--results-format", default="csv", choices=("csv", "json"))
    g.add_argument("--log-freq", type=int, default=50, help="batches between log lines")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument(
        "--bench-rounds",
        type=int,
        default=5,
        metavar="N",
        help="timing rounds for images_per_sec (0: not timed)",
    )
    g.add_argument("--bench-warmup", type=int, default=2, metavar="N")
    g.add_argument(
        "--no-malloc-env",
        action="store_true",
        help="leave glibc malloc as it is (the timing otherwise re-executes with steady-state "
        "MALLOC_MMAP_MAX_ / MALLOC_TRIM_THRESHOLD_, as gtp-bench does)",
    )
    _cli.add_gtp_arguments(p, many=True)
    return p


# ------------------------------------------------------------------------------ settings


@dataclasses.dataclass
class Variant:
    """One row: patch.timm keyword arguments (None: the unpatched model) and, when the
    schedule came from a budget, the gmacs_reduction asked for."""

    settings: dict | None
    gmacs_reduction: float | None = None


def settings_grid(args: argparse.Namespace) -> list[dict]:
    """Every combination of the GTP options, as patch.timm keyword arguments (num_prop or
    gmacs_reduction). --num-prop and --gmacs-reduction values share one axis."""
    props: list[tuple[str, Any]] = [("num_prop", v) for v in args.num_prop or []]
    props += [("gmacs_reduction", v) for v in args.gmacs_reduction or []]
    if not props:
        props = [("num_prop", 8)]
    axes = [getattr(args, name) for name in _cli.GTP_OPTIONS[1:]]
    grid = []
    for (key, value), rest in itertools.product(props, itertools.product(*axes)):
        grid.append({key: value, **dict(zip(_cli.GTP_OPTIONS[1:], rest, strict=True))})
    return grid


# ------------------------------------------------------------------------------ data


def _dataset(args: argparse.Namespace, transform: Any):
    from timm.data import create_dataset

    folder = not args.dataset or args.dataset.split("/")[0] in ("", "folder", "image_folder")
    try:
        ds = create_dataset(
            args.dataset,
            root=args.data,
            split=args.split,
            class_map=args.class_map,
            transform=transform,
            num_samples=args.num_samples if not folder else None,
        )
    except (FileNotFoundError, RuntimeError, AssertionError) as exc:
        if "Found 0 images" in str(exc):  # timm's folder reader on an empty tree
            raise _no_images(args.data) from None
        raise _cli.CLIError(f"cannot read the dataset in {args.data}: {exc}") from None
    if isinstance(ds, torch.utils.data.IterableDataset):
        return ds, None
    if len(ds) == 0:
        raise _no_images(args.data)
    indices = list(range(len(ds)))
    if args.num_samples is not None:
        if not 0 < args.num_samples:
            raise _cli.CLIError(f"--num-samples must be >= 1, got {args.num_samples}")
        n = min(args.num_samples, len(ds))
        indices = [i * len(ds) // n for i in range(n)]
    return ds, indices


def _no_images(root: str) -> _cli.CLIError:
    from timm.data.readers.img_extensions import get_img_extensions

    return _cli.CLIError(
        f"no images in {root} (expected an ImageFolder tree DIR/<class>/<image> with "
        f"extensions {', '.join(get_img_extensions())})"
    )


def _num_data_classes(ds) -> int | None:
    reader = getattr(ds, "reader", None)
    mapping = getattr(reader, "class_to_idx", None)
    return len(mapping) if mapping else None


# ------------------------------------------------------------------------------ running


class _Distributed:
    """RANK / WORLD_SIZE from the launcher (torchrun); a single process otherwise."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = device
        if self.world > 1:
            import torch.distributed as dist

            if device.type == "cuda" and device.index is None:
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def _activate(module: torch.nn.Module, settings: dict | None) -> None:
    """Give the one model instance a variant's settings (None: the unpatched model)."""
    import gtp_kernels.patch as gp

    if settings is None:
        gp.remove(module)
    else:
        gp.timm(module, **settings)


def _evaluate(model, module, variants, loader, args, dist, autocast, num_classes):
    """Counts (num_images, correct top-1, correct top-5) per variant on this process's part."""
    from tqdm import tqdm

    counts = torch.zeros(len(variants), 3, dtype=torch.int64)
    show = dist.main and not args.no_progress and sys.stderr.isatty()
    bar = tqdm(loader, desc=PROG, unit="batch", disable=not show, dynamic_ncols=True)
    k5 = min(5, num_classes)
    with torch.inference_mode():
        for step, (x, y) in enumerate(bar):
            x = x.to(dist.device, non_blocking=True)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = y.to(dist.device)
            if int(y.max()) >= num_classes or int(y.min()) < 0:
                raise _cli.CLIError(
                    f"the data has class index {int(y.max())} but the model has "
                    f"{num_classes} classes (pass --num-classes, or a --class-map)"
                )
            for i, variant in enumerate(variants):
                _activate(module, variant.settings)
                with autocast():
                    logits = model(x)
                top = logits.float().topk(k5, dim=1).indices
                hit = top == y[:, None]
                counts[i, 0] += y.shape[0]
                counts[i, 1] += int(hit[:, 0].sum())
                counts[i, 2] += int(hit.any(dim=1).sum())
            if dist.main and (show or (step + 1) % args.log_freq == 0):
                top1 = 100.0 * counts[:, 1] / counts[:, 0].clamp(min=1)
                said = " ".join(f"{v:.2f}" for v in top1.tolist())
                if show:
                    bar.set_postfix_str(f"top-1 (this part) {said}")
                else:
                    print(f"[{PROG}] batch {step + 1}/{len(loader)}: top-1 {said}", flush=True)
    return counts


def _throughput(model, module, variants, args, input_size, device, autocast) -> list[float]:
    """images/s of every variant on a random batch, timed alternately (median of rounds)."""
    from gtp_kernels.benchmark import timing

    x = torch.randn(args.batch_size, *input_size, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def call(settings):
        _activate(module, settings)
        with autocast():
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fns = {str(i): (lambda s=v.settings: call(s)) for i, v in enumerate(variants)}
    with torch.inference_mode():
        times = timing.alternating(
            fns, rounds=args.bench_rounds, warmup=args.bench_warmup, progress=False
        )
    return [args.batch_size / timing.median(times[name]) for name in fns]


def _row(args, module, variant, count, data_cfg, params, rate) -> OrderedDict:
    from gtp_kernels.cost import gmacs

    settings = variant.settings
    _activate(module, settings)
    n, c1, c5 = (int(v) for v in count)
    top1, top5 = 100.0 * c1 / n, 100.0 * c5 / n
    row = OrderedDict(
        model=args.model,
        top1=round(top1, 4),
        top1_err=round(100.0 - top1, 4),
        top5=round(top5, 4),
        top5_err=round(100.0 - top5, 4),
        param_count=round(params / 1e6, 2),
        img_size=data_cfg["input_size"][-1],
        crop_pct=data_cfg["crop_pct"],
        interpolation=data_cfg["interpolation"],
    )
    s = settings or {}
    for name in _cli.GTP_OPTIONS:
        row[name] = s.get(name)
    if settings is not None:
        row["num_prop"] = _cli.format_num_prop(s["num_prop"])
    row["gmacs_reduction"] = variant.gmacs_reduction
    row["gmacs"] = round(gmacs(module, tuple(data_cfg["input_size"][1:])), 3)
    row["images_per_sec"] = round(rate, 2) if rate is not None else None
    row["num_images"] = n
    return row


def write_results(path: str, rows: list[dict], fmt: str) -> None:
    """As timm's validate.py: a CSV with a header, or a JSON list."""
    with open(path, "w", newline="") as f:
        if fmt == "json":
            json.dump(rows, f, indent=4)
        else:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def _print_table(rows: list[dict]) -> None:
    from gtp_kernels.benchmark import timing

    cols = ["num_prop", "sparsity", "alpha", "graph", "selection", "propagation", "backend"]
    cols += ["gmacs", "images_per_sec", "top1", "top5", "num_images"]
    body = [["" if r[c] is None else r[c] for c in cols] for r in rows]
    print(timing.markdown_table(cols, body))


def evaluate(argv: Sequence[str] | None = None) -> list[dict]:
    """Run gtp-eval with these arguments; returns the rows (on every rank)."""
    args = build_parser().parse_args(argv)
    if args.bench_rounds > 0:
        from gtp_kernels.benchmark import timing

        # glibc reads these only at start: re-execute once with them (as gtp-bench does)
        module_argv = ["-m", __spec__.name] if __spec__ is not None else [sys.argv[0]]
        if argv is None:
            timing.ensure_malloc_env(not args.no_malloc_env, argv=module_argv + sys.argv[1:])
    folder = not args.dataset or args.dataset.split("/")[0] in ("", "folder", "image_folder")
    if folder and not os.path.exists(args.data):  # before the model: fail fast
        raise _cli.CLIError(f"data dir {args.data} does not exist")
    if args.batch_size < 1:
        raise _cli.CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = _cli.resolve_device(args.device)
    # Everything that can be checked on the model's shapes is, before any weight is made.
    probe = _cli.probe_model(args)
    state = _cli.checkpoint_state(args, probe)
    from timm.data import create_transform

    data_cfg = _cli.data_config(probe, args)
    input_size = tuple(data_cfg["input_size"])
    variants = [Variant(None)]
    for combo in settings_grid(args):
        settings = _cli.gtp_settings(probe, combo, input_size[1:])
        variants.append(Variant(settings, combo.get("gmacs_reduction")))

    ds, indices = _dataset(args, create_transform(**data_cfg, is_training=False))
    classes = _num_data_classes(ds)
    if classes is not None and classes > probe.num_classes:
        raise _cli.CLIError(
            f"the data has {classes} classes but the model {probe.num_classes} "
            "(pass --num-classes, or a --class-map)"
        )
    model = _cli.create_model(args, probe, state)
    dist = _Distributed(device)
    try:
        if indices is None:
            if dist.world > 1:
                raise _cli.CLIError(
                    "an iterable dataset cannot be sharded exactly; under torchrun use a "
                    "folder or tar dataset"
                )
            part = ds
        else:
            part = torch.utils.data.Subset(ds, indices[dist.rank :: dist.world])
        loader = torch.utils.data.DataLoader(
            part,
            batch_size=args.batch_size,
            shuffle=False,
            num_workers=args.workers,
            pin_memory=dist.device.type == "cuda",
        )
        module = model.to(dist.device)
        if args.channels_last:
            module = module.to(memory_format=torch.channels_last)
        run = module
        if args.torchcompile:
            import torch._dynamo as dynamo

            dynamo.reset()
            # every variant is a guard set of the same code: let them all stay compiled
            dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, 2 * len(variants))
            run = torch.compile(module, backend=args.torchcompile)
        if args.amp:
            dtype = getattr(torch, args.amp_dtype)

            def autocast():
                return torch.autocast(device_type=dist.device.type, dtype=dtype)
        else:
            autocast = nullcontext
        counts = _evaluate(run, module, variants, loader, args, dist, autocast, model.num_classes)
        counts = dist.sum(counts.to(dist.device)).cpu()
        rates: list[float | None] = [None] * len(variants)
        if args.bench_rounds > 0:
            if dist.main:  # alone: the other processes wait and do not share the device
                rates = _throughput(run, module, variants, args, input_size, dist.device, autocast)
            dist.barrier()
        params = sum(p.numel() for p in module.parameters())
        rows = [
            _row(args, module, variant, count, data_cfg, params, rate)
            for variant, count, rate in zip(variants, counts, rates, strict=True)
        ]
    finally:
        dist.close()
    if dist.main:
        _print_table(rows)
        if args.results_file:
            write_results(args.results_file, rows, args.results_format)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    _cli.run_main(PROG, evaluate, argv)


if __name__ == "__main__":
    main()
