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


# ------------------------------------------------------------------ benchmarks/gpu_check.sh
# It needs a GPU to do its work; here: its syntax, its report writer on fake step logs, and
# the whole run with fake commands (python, nvidia-smi, compute-sanitizer) in a scratch copy.

GPU_CHECK = os.path.join(ROOT, "benchmarks", "gpu_check.sh")


def test_gpu_check_syntax():
    subprocess.run(["bash", "-n", GPU_CHECK], check=True)


def test_gpu_check_shellcheck():
    import shutil

    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    out = subprocess.run(["shellcheck", GPU_CHECK], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def _fake_step(logs, name, kind, status, secs, log, cmd="cmd"):
    for ext, text in (("cmd", cmd), ("kind", kind), ("status", status), ("secs", secs)):
        (logs / f"{name}.{ext}").write_text(f"{text}\n")
    (logs / f"{name}.log").write_text(log)


def test_gpu_check_report_from_fake_logs(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "header").write_text("- GPU: Fake\n")
    table = "# what was measured\n| provider | ms |\n|---|---|\n| sdpa | 1.0 |\n"
    _fake_step(logs, "01-nvidia-smi", "text", "ok", 1, "GPU 0: Fake\n")
    lines = "".join(f"line {i}\n" for i in range(100))
    _fake_step(logs, "02-gpu-tests", "tail", "failed (exit 1)", 30, lines)
    noisy = f"  round 1/5: noise\n{table}\ntext between\n{table}"
    _fake_step(logs, "03-bench", "tables", "ok", 12, noisy, cmd="python bench.py")
    _fake_step(logs, "04-memcheck", "tail", "skipped: out of time", 0, "")
    out = tmp_path / "report.md"
    subprocess.run(["bash", GPU_CHECK, "--report", str(logs), str(out)], check=True)
    report = out.read_text()
    assert report.startswith("# GPU check report\n\n- GPU: Fake\n")
    for row in (
        "| 01-nvidia-smi | ok | 1 |",
        "| 02-gpu-tests | failed (exit 1) | 30 |",
        "| 03-bench | ok | 12 |",
        "| 04-memcheck | skipped: out of time | 0 |",
    ):
        assert row in report, report
    assert "43 s in the steps; 1 step(s) failed or timed out." in report
    assert "GPU 0: Fake" in report  # text: the whole log
    assert "line 59\n" not in report and "line 60\n" in report and "line 99\n" in report
    bench = report.split("## 03-bench: ok (12 s)\n\n`python bench.py`\n\n")[1].split("## 04")[0]
    # tables and '#' lines only, the '#' lines as list items
    listed = table.replace("# what was measured\n", "- what was measured\n\n")
    assert bench == f"{listed}\n{listed}\n", bench
    assert report.rstrip().endswith("## 04-memcheck: skipped: out of time (0 s)\n\n`cmd`")


def _fake_machine(tmp_path):
    """A scratch checkout holding gpu_check.sh, and fake python, nvidia-smi and
    compute-sanitizer: every benchmark prints a table, bench_propagate.py fails."""
    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    (repo / "gtp_kernels").mkdir()
    (repo / "benchmarks" / "gpu_check.sh").write_text(open(GPU_CHECK).read())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fakes = {
        "python-fake": """case "$*" in
  *setup.py*) echo "building" ;;
  *pytest*) echo "7 passed in 1.00s" ;;
  *bench_propagate.py*) echo "Traceback: boom" >&2; exit 3 ;;
  *.py*) printf 'noise\\n# %s\\n| provider | ms |\\n|---|---|\\n| x | 1.0 |\\n' "$1" ;;
  *) echo "python $*" ;;
esac""",
        "nvidia-smi": """case "$*" in
  *compute_cap*) echo 9.0 ;;
  *name,driver*) echo "Fake GPU, 1.0, 1 MiB" ;;
  *) echo "fake nvidia-smi" ;;
esac""",
        "compute-sanitizer": 'echo "sanitizer $*"; echo "ERROR SUMMARY: 0 errors"',
    }
    for name, body in fakes.items():
        path = bin_dir / name
        path.write_text(f"#!/usr/bin/env bash\n{body}\n")
        path.chmod(0o755)
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        PYTHON=str(bin_dir / "python-fake"),
        GTP_GPU_CHECK_REPORT=str(tmp_path / "report.md"),
    )
    env.pop("TORCH_CUDA_ARCH_LIST", None)
    return repo, env


STEPS = ["nvidia-smi", "build", "triton-tests", "info", "cuda-tests", "ceilings", "bench-attention",
         "bench-propagate", "bench-build-graph", "timm-deit_small", "timm-deit_base", "memcheck",
         "racecheck"]  # fmt: skip


def test_gpu_check_runs_every_step_with_fakes(tmp_path):
    repo, env = _fake_machine(tmp_path)
    out = subprocess.run(
        ["bash", str(repo / "benchmarks" / "gpu_check.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    report = (tmp_path / "report.md").read_text()
    for i, name in enumerate(STEPS, 1):
        status = "failed (exit 3)" if name == "bench-propagate" else "ok"
        assert f"| {i:02d}-{name} | {status} |" in report, report
    assert "TORCH_CUDA_ARCH_LIST=9.0" in report  # the GPU's own architecture
    assert "- benchmarks/bench_attention.py\n\n| provider | ms |" in report
    assert "Traceback: boom" in report  # a failed step shows its log's tail
    assert "--tool racecheck" in report and "7 passed" in report
    assert "total" in out.stdout and "report:" in out.stdout


def test_gpu_check_records_steps_it_has_no_time_for(tmp_path):
    repo, env = _fake_machine(tmp_path)
    env["GTP_GPU_CHECK_BUDGET"] = "5"
    subprocess.run(
        ["bash", str(repo / "benchmarks" / "gpu_check.sh")],
        env=env,
        check=True,
        capture_output=True,
        timeout=60,
    )
    report = (tmp_path / "report.md").read_text()
    for i, name in enumerate(STEPS, 1):
        assert f"| {i:02d}-{name} | skipped: out of time" in report, report
