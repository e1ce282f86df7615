"""The benchmark scripts run end to end on a tiny model and print consistent tables (they are the
project's main job; a script that no longer runs with the current API is a defect)."""

import os
import subprocess
import sys

import pytest

from gtp_kernels._extension import has_kernel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_cpu_ops = pytest.mark.skipif(
    not has_kernel("attention", "CPU") and os.environ.get("GTP_REQUIRE_EXTENSION") != "1",
    reason="gtp_kernels._C not built",
)


def _run(*args: str) -> str:
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout


def _table(text: str) -> tuple[list[str], dict[str, list[str]]]:
    """The markdown table of a report: header cells and {first cell: row cells}."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    header, body = cells[0], cells[2:]  # cells[1] is the |---| line
    return header, {row[0]: row for row in body}


@needs_cpu_ops
def test_bench_timm_runs_and_reports_every_variant():
    out = _run(
        "benchmarks/bench_timm.py",
        "--model", "deit_tiny_patch16_224", "--img-size", "96", "--batch", "2",
        "--num-prop", "2", "--sparsity", "0.6", "1.0",
        "--rounds", "1", "--warmup", "0", "--no-malloc-env",
    )  # fmt: skip
    header, rows = _table(out)
    assert header[:4] == ["variant", "GMACs", "images/s", "speed-up"]
    names = {"timm (unpatched)", "gtp reference, theta=0.6", "gtp cpu, theta=0.6",
             "gtp cpu, theta=1"}  # fmt: skip
    assert names <= set(rows), rows.keys()
    assert rows["timm (unpatched)"][3] == "1.000x"
    # every patched variant does fewer GMACs than the model (P=2 over 12 blocks of 36 tokens)
    base = float(rows["timm (unpatched)"][1])
    assert all(float(rows[n][1]) < base for n in names - {"timm (unpatched)"})
    assert "vs reference backend" in out  # the cpu backend was checked before timing


@needs_cpu_ops
def test_profile_timm_categories_add_up():
    out = _run(
        "benchmarks/profile_timm.py",
        "--model", "deit_tiny_patch16_224", "--img-size", "96", "--batch", "2",
        "--num-prop", "2", "--rounds", "1", "--no-malloc-env",
    )  # fmt: skip
    header, rows = _table(out)
    assert header[1:] == [
        "timm ms", "timm %", "gtp reference ms", "gtp reference %", "gtp cpu ms", "gtp cpu %",
    ]  # fmt: skip
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("profile_timm", os.path.join(ROOT, "benchmarks/profile_timm.py"))
    mod = module_from_spec(spec)
    spec.loader.exec_module(mod)
    for col in (1, 3, 5):  # ms columns of timm, reference, cpu
        parts = sum(float(rows[c][col]) for c in mod.CATEGORIES)
        assert parts == pytest.approx(float(rows["total (sum)"][col]), abs=0.05)
        own = sum(float(rows[c][col]) for c in mod.GTP_OWN)
        assert own == pytest.approx(float(rows["GTP's own work"][col]), abs=0.05)
    # the unpatched model does none of GTP's work; both patched ones do all of it
    assert float(rows["GTP's own work"][1]) == 0.0
    for col in (3, 5):
        for cat in ("threshold", "graph", "selection", "propagation"):
            assert float(rows[cat][col]) > 0.0, (cat, header[col])
    # timm's attention is its fused SDPA, found by op name
    assert float(rows["attention"][1]) > 0.0


@needs_cpu_ops
def test_bench_onnx_runs_and_checks_every_session():
    pytest.importorskip("onnxruntime")
    out = _run(
        "benchmarks/bench_onnx.py",
        "--model", "deit_tiny_patch16_224", "--img-size", "64", "--depth", "2", "--batch", "2",
        "--num-prop", "1", "--sparsity", "0.6",
        "--rounds", "1", "--warmup", "0", "--no-malloc-env",
    )  # fmt: skip
    header, rows = _table(out)
    assert header[:4] == ["ORT session", "GMACs", "images/s", "speed-up"]
    assert {"timm (unpatched)", "gtp, theta=0.6"} <= set(rows), rows.keys()
    assert rows["timm (unpatched)"][3] == "1.000x"
    assert out.count("ORT vs eager") == 2  # every session was checked before timing


def _rows(text: str) -> dict[str, list[str]]:
    """Every markdown table row of a report: {first cell: cells}."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


@needs_cpu_ops
def test_bench_attention_cpu():
    out = _run(
        "benchmarks/bench_attention.py",
        "--batch", "2", "--heads", "2", "--dim", "16", "--tokens", "17", "--rounds", "1",
    )  # fmt: skip
    rows = _rows(out)
    for name in ("sdpa (theta 1, no score)", "cpu theta 1, score none", "cpu theta 1",
                 "cpu theta 0.6", "cpu theta 0.6, nth_element", "reference theta 0.6"):  # fmt: skip
        assert name in rows, rows.keys()
    assert rows["sdpa (theta 1, no score)"][3] == "1.00x"
    assert "Tile-phase breakdown" in out and "theta 0.6" in rows
    # without the interpreter and without a GPU, Triton's absence is reported, not hidden
    assert "provider triton" in out


@needs_cpu_ops
def test_bench_propagate_cpu():
    out = _run(
        "benchmarks/bench_propagate.py",
        "--batch", "2", "--grid", "4", "--channels", "16", "--num-prop", "2", "--k", "3",
        "--rounds", "1",
    )  # fmt: skip
    rows = _rows(out)
    assert {"reference", "cpu", "index_select (copy floor)"} <= set(rows), rows.keys()
    assert rows["reference"][3] == "1.0x"


@needs_cpu_ops
def test_bench_build_graph_cpu():
    out = _run(
        "benchmarks/bench_build_graph.py",
        "--batch", "2", "--height", "4", "--width", "4", "--channels", "16", "--k", "3",
        "--num-prop", "2", "--rounds", "1", "--no-model",
    )  # fmt: skip
    rows = _rows(out)
    for op in ("build_graph", "select_tokens"):
        assert {f"{op} reference", f"{op} cpu"} <= set(rows), rows.keys()
