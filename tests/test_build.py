"""The compiled extension: it is built, registers every op with a CPU and a fake kernel, and
reports how it was built. scripts/test.sh sets GTP_REQUIRE_EXTENSION=1 so that a missing build
fails CI instead of skipping."""

import glob
import os
import subprocess
import sys

import pytest
import torch

import gtp_kernels.ops  # noqa: F401  (registers fake kernels)
from gtp_kernels._extension import extension_available, extension_error, has_kernel
from gtp_kernels.info import OPS, collect

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = os.environ.get("GTP_REQUIRE_EXTENSION") == "1"
needs_ext = pytest.mark.skipif(
    not extension_available() and not REQUIRED,
    reason=f"gtp_kernels._C not built: {extension_error()}",
)


@needs_ext
def test_extension_is_built():
    assert extension_available(), f"gtp_kernels._C failed to import: {extension_error()}"


@needs_ext
@pytest.mark.parametrize("op", OPS)
def test_every_op_has_cpu_and_fake_kernel(op):
    assert hasattr(torch.ops.gtp, op), f"torch.ops.gtp.{op} is not registered"
    assert has_kernel(op, "CPU"), f"gtp.{op} has no CPU kernel"
    assert has_kernel(op, "Meta"), f"gtp.{op} has no fake (Meta) kernel"


@needs_ext
def test_cuda_build_registers_cuda_kernels():
    """A CUDA build registers a CUDA kernel for every op that has a .cu file (no device needed)."""
    from gtp_kernels import _C

    cu_ops = [os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "csrc/cuda/*.cu"))]
    if not _C.build_info()["cuda"]:
        pytest.skip("extension built without CUDA kernels (see `python -m gtp_kernels.info`)")
    for op in cu_ops:
        assert has_kernel(op, "CUDA"), f"CUDA build but gtp.{op} has no CUDA kernel"


@needs_ext
def test_build_info_reports_openmp():
    from gtp_kernels import _C

    info = _C.build_info()
    assert info["torch_version"] == torch.__version__.split("+")[0]
    assert info["openmp"], "built without OpenMP: at::parallel_for would run on one thread"


def test_info_command_runs():
    out = subprocess.run(
        [sys.executable, "-m", "gtp_kernels.info"], capture_output=True, text=True, check=True
    ).stdout
    assert "| propagate |" in out and "torch" in out
    assert set(collect()["kernels"]) == set(OPS)


def test_missing_backend_error_says_how_to_fix():
    from gtp_kernels.ops import resolve_backend

    with pytest.raises(RuntimeError, match="Triton backend is not implemented"):
        resolve_backend("propagate", "triton", torch.device("cpu"))
    with pytest.raises(RuntimeError, match="needs tensors on cuda"):
        resolve_backend("propagate", "cuda", torch.device("cpu"))
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("propagate", "gpu", torch.device("cpu"))
