"""Top-1 against GMACs and against images/s, from a gtp-eval results file.

    gtp-eval /data/imagenet/val -m deit_small_patch16_224 --num-prop 0 2 4 6 8 10 12 \\
        --sparsity 1 0.6 --propagation graph none --results-file results.csv
    python benchmarks/plot_tradeoff.py results.csv --out tradeoff.png

One line per (model, propagation, selection). Several rows of a line can share a num_prop (and
so its GMACs) with other sparsities, alphas, graphs, ...: the line goes through the best top-1
of each num_prop, the other rows are drawn as small dots. The unpatched model is a star. The
images/s panel shows the same rows (rows without a timing are left out there).
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict


def read_rows(path: str) -> list[dict]:
    """The rows of a gtp-eval results file (CSV or JSON), numbers as floats, '' as None."""
    if path.endswith(".json"):
        with open(path) as f:
            raw = json.load(f)
    else:
        with open(path, newline="") as f:
            raw = list(csv.DictReader(f))
    rows = []
    for r in raw:
        row = {}
        for k, v in r.items():
            if v in ("", None):
                row[k] = None
            elif k in ("top1", "top5", "gmacs", "images_per_sec"):
                row[k] = float(v)
            else:
                row[k] = str(v)
        rows.append(row)
    return rows


def series(rows: list[dict]) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """(lines, baselines): lines[label] = the best-top-1 row of every num_prop of that
    (model, propagation, selection), by decreasing GMACs; baselines[model] = unpatched rows."""
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    baselines: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r.get("num_prop") is None:
            baselines[r["model"]].append(r)
            continue
        label = f"{r['model']}: {r['propagation']} / {r['selection']}"
        best = groups[label].get(r["num_prop"])
        if best is None or r["top1"] > best["top1"]:
            groups[label][r["num_prop"]] = r
    lines = {
        label: sorted(best.values(), key=lambda r: -r["gmacs"]) for label, best in groups.items()
    }
    return lines, dict(baselines)


def plot(rows: list[dict], out: str, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines, baselines = series(rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100, sharey=True)
    for ax, key, name in ((axes[0], "gmacs", "GMACs"), (axes[1], "images_per_sec", "images/s")):
        for i, (label, chosen) in enumerate(lines.items()):
            colour = f"C{i % 10}"
            pts = [(r[key], r["top1"]) for r in chosen if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), "-o", color=colour, label=label, ms=4)
            others = [
                (r[key], r["top1"])
                for r in rows
                if r.get("num_prop") is not None
                and f"{r['model']}: {r['propagation']} / {r['selection']}" == label
                and r.get(key) is not None
                and r not in chosen
            ]
            if others:
                ax.plot(*zip(*others, strict=True), ".", color=colour, alpha=0.4, ms=4)
        for model, base in baselines.items():
            pts = [(r[key], r["top1"]) for r in base if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), "*", color="black", ms=11,
                        label=f"{model} (unpatched)")  # fmt: skip
        ax.set_xlabel(name)
        ax.grid(alpha=0.3)
    axes[0].invert_xaxis()  # fewer GMACs to the right, like faster images/s
    axes[0].set_ylabel("top-1 (%)")
    axes[1].legend(fontsize=8, loc="lower left")
    fig.suptitle(title or ", ".join(sorted({r["model"] for r in rows})))
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("results", help="gtp-eval --results-file (CSV or JSON)")
    p.add_argument("--out", default="tradeoff.png", help="output image (PNG, SVG, PDF, ...)")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    rows = read_rows(args.results)
    if not rows:
        raise SystemExit(f"plot_tradeoff: {args.results} has no rows")
    plot(rows, args.out, args.title)
    print(f"plot_tradeoff: wrote {args.out} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
