"""The benchmark scripts' GPU-capable code paths at a tiny size, with the triton provider: under
the Triton interpreter on CPU tensors in CI (`--device cpu`), on CUDA tensors on a machine with
a GPU (`--device cuda`, then with the cuda provider too). Each script checks every provider
against the reference before timing it and prints a table; these tests read the tables.

An op without a Triton kernel yet (not in gtp_kernels.triton.OPS) is not skipped silently: the
script must say that its triton provider was not run and why.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from test_benchmarks import _rows
from triton_device import DEVICE

from gtp_kernels.benchmark.timing import MALLOC_ENV
from gtp_kernels.info import OPS

gt = pytest.importorskip("gtp_kernels.triton", reason="gtp_kernels.triton needs triton")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROVIDERS = ["--providers", "reference", "cuda", "triton"]  # cuda only counts on CUDA tensors


def _run(script: str, *args: str) -> str:
    # The malloc settings the scripts would re-execute themselves with: set, so they do not.
    env = dict(os.environ, PYTHONPATH=ROOT, **MALLOC_ENV)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", script), "--device", DEVICE, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout


def _timed(rows: dict, name: str) -> None:
    assert name in rows, f"no row {name!r} in {list(rows)}"
    assert float(rows[name][1]) > 0.0, rows[name]


def _not_run(out: str, op: str) -> None:
    """The report says that op's triton provider did not run, and why."""
    assert f"gtp.{op} has no Triton kernel" in out, out


def test_bench_attention():
    out = _run(
        "bench_attention.py",
        "--batch", "2", "--heads", "2", "--dim", "16", "--tokens", "17", "--rounds", "1",
        *PROVIDERS,
    )  # fmt: skip
    rows = _rows(out)
    _timed(rows, "sdpa (theta 1, no score)")
    _timed(rows, "reference theta 0.6")
    if "attention" in gt.OPS:
        for name in ("triton theta 1, score none", "triton theta 1", "triton theta 0.6"):
            _timed(rows, name)
            assert rows[name][3].endswith("x")  # the ratio to sdpa
    else:
        _not_run(out, "attention")


def test_bench_propagate():
    out = _run(
        "bench_propagate.py",
        "--batch", "2", "--grid", "4", "--channels", "16", "--num-prop", "2", "--k", "3",
        "--rounds", "1", *PROVIDERS,
    )  # fmt: skip
    rows = _rows(out)
    _timed(rows, "reference")
    _timed(rows, "index_select (copy floor)")
    if "propagate" in gt.OPS:
        _timed(rows, "triton")
    else:
        _not_run(out, "propagate")


def test_bench_build_graph_and_select_tokens():
    out = _run(
        "bench_build_graph.py",
        "--batch", "2", "--height", "4", "--width", "4", "--channels", "16", "--k", "3",
        "--num-prop", "2", "--rounds", "1", "--no-model", *PROVIDERS,
    )  # fmt: skip
    rows = _rows(out)
    for op in ("build_graph", "select_tokens"):
        _timed(rows, f"{op} reference")
        if op in gt.OPS:
            _timed(rows, f"{op} triton")
        else:
            _not_run(out, op)


def test_bench_timm():
    missing = [op for op in OPS if op not in gt.OPS]
    if missing:
        pytest.skip(f"a model patched with backend triton needs every op; no Triton {missing}")
    out = _run(
        "bench_timm.py",
        "--model", "deit_tiny_patch16_224", "--img-size", "64", "--depth", "2", "--batch", "2",
        "--num-prop", "2", "--neighbours", "2", "--sparsity", "0.6",
        "--backends", "reference", "triton",
        "--rounds", "1", "--warmup", "0", "--no-malloc-env",
    )  # fmt: skip
    rows = _rows(out)
    assert rows["timm (unpatched)"][3] == "1.000x"
    _timed(rows, "gtp triton, theta=0.6")
    assert "gtp triton, theta=0.6 vs reference backend" in out  # checked before timing
