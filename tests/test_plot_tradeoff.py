"""benchmarks/plot_tradeoff.py draws a gtp-eval results file: which rows make each line, and
the picture itself (both panels have every line's colour)."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.util import module_from_spec, spec_from_file_location

import numpy as np
from PIL import Image

from gtp_kernels.eval import COLUMNS, write_results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "plot_tradeoff.py")


def _module():
    spec = spec_from_file_location("plot_tradeoff", SCRIPT)
    mod = module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rows() -> list[dict]:
    """A small sweep as gtp-eval writes it: the unpatched model, graph propagation at two P and
    two sparsities, pruning at two P."""

    def row(num_prop, sparsity, propagation, top1, gmacs, speed):
        r = dict.fromkeys(COLUMNS)
        r.update(model="deit_small_patch16_224", top1=top1, top5=95.0, gmacs=gmacs,
                 images_per_sec=speed, num_prop=num_prop, sparsity=sparsity,
                 propagation=propagation, selection="mixed_max" if num_prop else None)  # fmt: skip
        return r

    return [
        row(None, None, None, 79.8, 4.6, 100.0),
        row("4", 1.0, "graph", 79.6, 4.0, 114.0),
        row("4", 0.6, "graph", 79.7, 4.0, 113.0),
        row("8", 1.0, "graph", 79.2, 3.42, 133.0),
        row("8", 0.6, "graph", 79.3, 3.42, 131.0),
        row("4", 1.0, "none", 79.1, 4.0, 115.0),
        row("8", 1.0, "none", 77.9, 3.42, 134.0),
    ]


def test_series_take_the_best_row_of_each_num_prop(tmp_path):
    path = tmp_path / "r.csv"
    write_results(str(path), _rows(), "csv")
    mod = _module()
    rows = mod.read_rows(str(path))
    assert rows[0]["num_prop"] is None and rows[1]["gmacs"] == 4.0
    lines, base = mod.series(rows)
    assert (
        list(base) == ["deit_small_patch16_224"]
        and base["deit_small_patch16_224"][0]["top1"] == 79.8
    )
    graph = lines["deit_small_patch16_224: graph / mixed_max"]
    assert [(r["num_prop"], r["top1"]) for r in graph] == [("4", 79.7), ("8", 79.3)]
    prune = lines["deit_small_patch16_224: none / mixed_max"]
    assert [r["top1"] for r in prune] == [79.1, 77.9]


def test_draws_both_panels(tmp_path):
    path, out = tmp_path / "r.json", tmp_path / "tradeoff.png"
    write_results(str(path), _rows(), "json")
    env = dict(os.environ, PYTHONPATH=ROOT, MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, SCRIPT, str(path), "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and "7 rows" in proc.stdout
    img = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert img.shape == (420, 1100, 3)  # figsize (11, 4.2) at 100 dpi
    half = img.shape[1] // 2
    for colour in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)):  # the lines: C0 and C1
        near = np.abs(img - np.array(colour)).sum(-1) < 30
        assert near[:, :half].sum() > 20 and near[:, half:].sum() > 20, colour
