"""Where the time of a timm ViT forward goes, unpatched and GTP-patched: a per-category profile.

    PYTHONPATH=. python benchmarks/profile_timm.py [--model deit_small_patch16_224] [--batch 16]
        [--sparsity 0.6] [--backends reference cpu] [--rounds 5]

Each variant (timm, gtp <backend>) runs one profiled forward per round, alternately, under
torch.profiler; the table gives the median over rounds of each category's milliseconds per
forward and its share of the forward. Every profiled CPU event's *self* time is charged to one
category: its own (by op name, e.g. gtp::propagate, scaled_dot_product_attention, kthvalue) or
that of the nearest enclosing scope this script opens around the model's modules and the gtp
ops (forward hooks, wrapped gtp_kernels.ops functions). "python / glue" is the forward's wall
time not inside any profiled op (interpreter, module calls). The profiler adds roughly 1-3% to
the forward; compare the categories with each other, and take speed-ups from bench_timm.py.

Categories:
  patch embed, layer norms, head   timm's modules, unchanged by GTP
  linear (qkv, proj)               the attention projections
  mlp                              fc1, GELU, fc2
  attention                        QK^T, softmax, A @ V (timm: its fused SDPA)
  threshold                        top-theta: the kth-value select over each N x N map
  mask + scores                    zeroing entries below tau and the importance scores (the
                                   cpu kernel does both in one pass over the tile)
  graph, selection, propagation    gtp.build_graph, gtp.select_tokens, gtp.propagate
  other ops                        reshapes, residual adds, log sizes, ...
The split of the fused gtp.attention kernel (backend cpu) into attention / threshold /
mask + scores comes from the kernel's own per-phase timers (GTP_ATTENTION_PROFILE), read on an
extra forward and applied as fractions to the op's profiled time. GTP's own work = threshold +
mask + scores + graph + selection + propagation.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from gtp_kernels.benchmark import models, timing

CATEGORIES = (
    "patch embed, layer norms, head",
    "linear (qkv, proj)",
    "mlp",
    "attention",
    "threshold",
    "mask + scores",
    "graph",
    "selection",
    "propagation",
    "other ops",
    "python / glue",
)
GTP_OWN = ("threshold", "mask + scores", "graph", "selection", "propagation")

_SCOPE = "gtp-profile:"  # prefix of the record_function scopes this script opens
# op name -> category, for ops that say what they are wherever they run
_BY_NAME = {
    "aten::scaled_dot_product_attention": "attention",
    "aten::kthvalue": "threshold",
    "gtp::build_graph": "graph",
    "gtp::select_tokens": "selection",
    "gtp::propagate": "propagation",
}
# inside the reference attention's probabilities scope: the masking ops are the threshold's
_THRESHOLD_OPS = ("aten::kthvalue", "aten::lt", "aten::where", "aten::zeros_like")


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    models.add_model_arguments(p, batch=16)
    p.add_argument("--sparsity", type=float, default=0.6)
    p.add_argument("--backends", nargs="+", default=["reference", "cpu"])
    p.add_argument("--rounds", type=int, default=5)
    return p.parse_args(argv)


def _scope_hooks(model: torch.nn.Module) -> list:
    """Open a record_function scope around the modules whose time has a category."""
    targets = [(model.patch_embed, "patch embed, layer norms, head")]
    for name in ("norm", "fc_norm", "head", "head_dist", "head_drop"):
        mod = getattr(model, name, None)
        if isinstance(mod, torch.nn.Module):
            targets.append((mod, "patch embed, layer norms, head"))
    for blk in model.blocks:
        targets += [
            (blk.norm1, "patch embed, layer norms, head"),
            (blk.norm2, "patch embed, layer norms, head"),
            (blk.attn.qkv, "linear (qkv, proj)"),
            (blk.attn.proj, "linear (qkv, proj)"),
            (blk.mlp, "mlp"),
        ]
    handles = []
    for mod, cat in targets:
        state: list = []

        def pre(_m, _a, cat=cat, state=state):
            state.append(record_function(_SCOPE + cat))
            state[-1].__enter__()

        def post(_m, _a, _o, state=state):
            state.pop().__exit__(None, None, None)

        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    return handles


@contextlib.contextmanager
def _scoped_gtp_functions():
    """Wrap the gtp op wrappers (any backend) and the reference attention's parts in scopes."""
    import importlib

    ops = importlib.import_module("gtp_kernels.ops")
    # (the package gtp_kernels.reference exports a function named like this module)
    ref_attn = importlib.import_module("gtp_kernels.reference.attention")

    wraps = [
        (ops, "attention", "attention"),
        (ops, "build_graph", "graph"),
        (ops, "select_tokens", "selection"),
        (ops, "propagate", "propagation"),
        (ref_attn, "attention_probs", "attention"),
        (ref_attn, "importance_score", "mask + scores"),
    ]
    saved = []
    for owner, name, cat in wraps:
        fn = getattr(owner, name)

        def scoped(*a, _fn=fn, _cat=cat, **kw):
            with record_function(_SCOPE + _cat):
                return _fn(*a, **kw)

        saved.append((owner, name, fn))
        setattr(owner, name, scoped)
    try:
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def _categorise(events, wall_us: float) -> dict[str, float]:
    """Milliseconds per category from the profiler's event tree (self times, nearest scope)."""
    ms = dict.fromkeys(CATEGORIES, 0.0)
    fused_us = 0.0  # self time of gtp::attention (split by phase fractions later)
    covered = 0.0

    def visit(ev, scope: str | None) -> None:
        nonlocal fused_us
        name = ev.name
        cat = scope
        if name.startswith(_SCOPE):
            cat = name[len(_SCOPE) :]
        elif name in _BY_NAME:
            cat = _BY_NAME[name]
        elif scope == "attention" and name in _THRESHOLD_OPS:
            cat = "threshold"
        self_us = ev.self_cpu_time_total
        if name == "gtp::attention":
            fused_us += self_us
        else:
            ms[cat or "other ops"] += self_us / 1e3
        for child in ev.cpu_children:
            visit(child, cat)

    roots = [ev for ev in events if ev.cpu_parent is None]
    for ev in roots:
        covered += ev.cpu_time_total
        visit(ev, None)
    ms["python / glue"] = max(wall_us - covered, 0.0) / 1e3
    ms["_fused_attention"] = fused_us / 1e3
    return ms


def _attention_phases(model, x) -> dict[str, float]:
    """Fractions of gtp.attention (cpu) time per category, from the kernel's phase timers."""
    with tempfile.NamedTemporaryFile("r", suffix=".txt") as f:
        os.environ["GTP_ATTENTION_PROFILE"] = f.name
        try:
            model(x)
        finally:
            del os.environ["GTP_ATTENTION_PROFILE"]
        totals: dict[str, float] = {}
        for line in f.read().split("\n"):
            for item in line.split():
                key, val = item.split("=")
                totals[key] = totals.get(key, 0.0) + float(val)
    all_s = sum(totals.values()) or 1.0
    return {
        "attention": (totals["pack"] + totals["qk"] + totals["softmax"] + totals["av"]) / all_s,
        "threshold": totals["select"] / all_s,
        "mask + scores": totals["mask_scores"] / all_s,
    }


def _profile_once(model, x) -> dict[str, float]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        model(x)
        wall_us = (time.perf_counter() - start) * 1e6
    return _categorise(prof.events(), wall_us)


def main(argv=None) -> None:
    args = _parse(argv)
    alloc = timing.ensure_malloc_env(not args.no_malloc_env)

    base, x = models.model_and_input(args)
    variants = {"timm": base}
    for backend in args.backends:
        variants[f"gtp {backend}"] = models.patched_copy(base, args, args.sparsity, backend)
    machine = timing.machine_description()
    print(
        f"# {args.model}, batch {args.batch}, float32, P={args.num_prop}, "
        f"theta={args.sparsity:g}, alpha={args.alpha:g}, K={args.neighbours}; "
        f"{machine['threads']} threads, torch {machine['torch']}, git {machine['git']}"
    )
    print(f"# allocator: {alloc}; median of {args.rounds} profiled forwards per variant")

    results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    phases: dict[str, dict[str, float]] = {}
    hooks = [h for m in variants.values() for h in _scope_hooks(m)]
    try:
        with torch.inference_mode(), _scoped_gtp_functions():
            for name, m in variants.items():  # warm-up
                m(x)
                if name != "timm" and m.gtp.backend != "reference":
                    phases[name] = _attention_phases(m, x)
            for r in range(args.rounds):
                for name, m in variants.items():
                    results[name].append(_profile_once(m, x))
                print(f"  round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
    finally:
        for h in hooks:
            h.remove()

    table: dict[str, dict[str, float]] = {}
    for name, runs in results.items():
        for run in runs:  # split the fused kernel's time by its phase fractions
            fused = run.pop("_fused_attention")
            for cat, frac in phases.get(name, {"attention": 1.0}).items():
                run[cat] += frac * fused
        table[name] = {k: statistics.median(run[k] for run in runs) for k in CATEGORIES}

    header = ["category"]
    for name in variants:
        header += [f"{name} ms", f"{name} %"]
    rows = []
    for cat in (*CATEGORIES, "total (sum)", "GTP's own work"):
        row = [cat]
        for name in variants:
            t = table[name]
            total = sum(t[c] for c in CATEGORIES)
            if cat == "total (sum)":
                val = total
            elif cat == "GTP's own work":
                val = sum(t[c] for c in GTP_OWN)
            else:
                val = t[cat]
            row += [f"{val:.2f}", f"{100 * val / total:.1f}%"]
        rows.append(row)
    print(timing.markdown_table(header, rows))


if __name__ == "__main__":
    main()
