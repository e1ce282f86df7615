"""AOTInductor: a GTP-patched DeiT-tiny compiled once per test session into a .pt2 package
(dynamic batch), run from Python and from the C++ runner (tests/cpp/aoti_run.cpp, CMake target
gtp_aoti_run), against the eager model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from export_helpers import peaked_deit_tiny

import gtp_kernels.export as gx
from gtp_kernels._extension import extension_available

pytestmark = pytest.mark.skipif(
    not extension_available(), reason="torch.ops.gtp.* needs gtp_kernels._C (build it)"
)
ROOT = Path(__file__).resolve().parents[1]
# Inductor fuses and reorders the elementwise work around the gtp ops (layer norms, GELU,
# residuals): float32 rounding, a few ulps of O(1) logits after 2 blocks.
TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """(eager model, package path): one AOTInductor compile for the file (about a minute)."""
    model = peaked_deit_tiny(depth=2, num_prop=8, sparsity=0.6)
    path = tmp_path_factory.mktemp("aoti") / "deit_tiny_gtp.pt2"
    gx.aoti_compile(model, torch.randn(2, 3, 96, 96), path)
    return model, path


def runner_binary() -> Path:
    """The C++ runner: $GTP_AOTI_RUNNER, else build/cmake/gtp_aoti_run (scripts/test.sh
    builds it before pytest), else it is built here with CMake."""
    if os.environ.get("GTP_AOTI_RUNNER"):
        return Path(os.environ["GTP_AOTI_RUNNER"])
    binary = ROOT / "build" / "cmake" / "gtp_aoti_run"
    if not binary.exists():
        build = ROOT / "build" / "cmake"
        subprocess.run(
            ["cmake", "-S", str(ROOT), "-B", str(build), f"-DPython3_EXECUTABLE={sys.executable}"],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            ["cmake", "--build", str(build), "-j", "2", "--target", "gtp_aoti_run"],
            check=True,
            capture_output=True,
        )
    return binary


def test_python_load_equals_eager(compiled):
    model, path = compiled
    run = torch._inductor.aoti_load_package(str(path))
    for batch in (1, 3):
        x = torch.randn(batch, 3, 96, 96)
        with torch.no_grad():
            torch.testing.assert_close(run(x), model(x), **TOL)


def test_cpp_runner_equals_eager(compiled, tmp_path):
    model, path = compiled
    x = torch.randn(3, 3, 96, 96)
    np.save(tmp_path / "images.npy", x.numpy())
    out = tmp_path / "logits.npy"
    proc = subprocess.run(
        [str(runner_binary()), str(path), str(tmp_path / "images.npy"), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "logits [3, 1000]" in proc.stdout
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(np.load(out)), model(x), **TOL)


def test_cpp_runner_bad_input(compiled, tmp_path):
    _, path = compiled
    np.save(tmp_path / "images.npy", np.zeros((2, 3, 96, 96), np.float64))
    proc = subprocess.run(
        [str(runner_binary()), str(path), str(tmp_path / "images.npy"), str(tmp_path / "o.npy")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and "expected float32" in proc.stderr
