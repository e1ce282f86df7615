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


def _from_setup(name: str):
    """A top-level definition of setup.py, evaluated alone (importing setup.py runs setup())."""
    import ast
    import shutil

    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            namespace = {"os": os, "shutil": shutil}
            exec(compile(ast.Module([node], []), "setup.py", "exec"), namespace)
            return namespace[name]
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == name:
            return ast.literal_eval(node.value)
    raise AssertionError(f"setup.py defines no {name}")


def _cuda_toolchain() -> str | None:
    """Why setup.py would not build CUDA kernels here, or None when it would (auto mode)."""
    _cuda_home_from_nvcc = _from_setup("_cuda_home_from_nvcc")
    if os.environ.get("GTP_BUILD_CUDA", "auto").lower() == "0":
        return "GTP_BUILD_CUDA=0"
    if torch.version.cuda is None:
        return "torch is not a CUDA build"
    if _cuda_home_from_nvcc() is None:
        return "no nvcc"
    return None


@needs_ext
def test_cuda_build_registers_cuda_kernels():
    """Where nvcc and a CUDA torch are present (CI), the build has CUDA kernels, and a CUDA build
    registers a CUDA kernel for every op, each from its csrc/cuda/<op>.cu (no device needed)."""
    from gtp_kernels import _C

    why_not = _cuda_toolchain()
    if why_not is None:
        assert _C.build_info()["cuda"], (
            "nvcc and a CUDA torch are present but the extension was built without CUDA kernels"
        )
    if not _C.build_info()["cuda"]:
        pytest.skip(f"extension built without CUDA kernels ({why_not})")
    cu_ops = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "csrc/cuda/*.cu"))}
    assert cu_ops == set(OPS), f"csrc/cuda has .cu files for {sorted(cu_ops)}, ops are {OPS}"
    for op in OPS:
        assert has_kernel(op, "CUDA"), f"CUDA build but gtp.{op} has no CUDA kernel"


@needs_ext
def test_cuda_kernels_have_no_stack_or_local_memory():
    """The second gate after ptxas: every kernel in the built extension, every architecture,
    0 bytes of stack and local memory (benchmarks/cuda_resources.py --check)."""
    from gtp_kernels import _C

    if not _C.build_info()["cuda"]:
        pytest.skip("extension built without CUDA kernels")
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "cuda_resources.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    archs = {line.split("|")[3].strip() for line in out.stdout.splitlines()[2:]}
    assert {"sm_80", "sm_90"} <= archs, f"architectures in the build: {archs}"


def _triton_resources():
    """benchmarks/triton_resources.py as a module (its problems and input builders)."""
    from importlib.util import module_from_spec, spec_from_file_location

    path = os.path.join(ROOT, "benchmarks", "triton_resources.py")
    spec = spec_from_file_location("triton_resources", path)
    module = module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_triton_gate_inputs_are_the_ops_inputs():
    """The compile gate's input builders give valid arguments of every op (its fake kernel
    accepts them), whether or not the op has a Triton kernel yet."""
    pytest.importorskip("triton", reason="triton is not installed (the gate needs it)")
    import importlib

    fakes = {
        op: getattr(importlib.import_module(f"gtp_kernels.ops.{op}"), f"{op}_fake") for op in OPS
    }
    gate = _triton_resources()
    assert set(gate.BUILDERS) == set(OPS)
    for op, build in gate.BUILDERS.items():
        calls = 0
        for problem in gate.PROBLEMS:
            if problem.attention_only and op != "attention":
                continue
            for dtype in gate.DTYPES:
                for args in build(problem, dtype):
                    fakes[op](*args)
                    calls += 1
        assert calls > 0, op


def test_triton_compile_gate():
    """Every Triton kernel, in every configuration its launcher picks for the patched models of
    benchmarks/triton_resources.py, compiles for sm_80 and sm_90 without stack, local memory or
    more shared memory than an A100 has (`--check`; no GPU). It fails too when an op in
    gtp_kernels.triton.OPS has no input builder there."""
    pytest.importorskip("triton", reason="triton is not installed (the gate needs it)")
    import gtp_kernels.triton as gt

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "triton_resources.py"), "--check"],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    assert out.returncode == 0, out.stdout[-8000:] + out.stderr[-8000:]
    rows = [line.split("|") for line in out.stdout.splitlines() if line.startswith("| `")]
    kernels = {row[1].strip().strip("`") for row in rows}
    archs = {row[4].strip() for row in rows}
    for op in gt.OPS:
        assert any(k.startswith(f"{op}.") for k in kernels), f"no {op} kernel compiled: {kernels}"
    assert archs == {"sm_80", "sm_90"}, archs


SPILLING = {
    # registers spilled: a large live set under a 32-register budget
    "spill": """
__global__ void __launch_bounds__(1024, 2) spill(float* x) {
  float a[96];
#pragma unroll
  for (int t = 0; t < 96; ++t) a[t] = x[t * blockDim.x + threadIdx.x];
  float s = 0;
#pragma unroll
  for (int t = 0; t < 96; ++t) s += a[t] * a[(t * 7) % 96];
  x[threadIdx.x] = s;
}
""",
    # no spill at all, but a dynamically indexed local array: -warn-spills alone passes it
    "local_array": """
__global__ void __launch_bounds__(256, 1) local_array(float* x, const int* idx) {
  float a[256];
  for (int t = 0; t < 256; ++t) a[t] = x[t * blockDim.x + threadIdx.x];
  float s = 0;
  for (int t = 0; t < 256; ++t) s += a[idx[t]];
  x[threadIdx.x] = s;
}
""",
    "clean": """
__global__ void __launch_bounds__(256, 1) clean(float* x) { x[threadIdx.x] *= 2.0f; }
""",
}


@pytest.mark.parametrize("kernel", list(SPILLING))
def test_spill_gate(kernel, tmp_path):
    """The build's ptxas flags fail a kernel that spills or uses local memory, and pass a clean
    one (nvcc, sm_90 cubin only: a few seconds, no torch headers)."""
    home = _from_setup("_cuda_home_from_nvcc")()
    if home is None:
        pytest.skip("no nvcc")
    src = tmp_path / f"{kernel}.cu"
    src.write_text(SPILLING[kernel])
    ptxas = [f for f in _from_setup("NVCC_STRICT") if f.startswith("-Xptxas")]
    cmd = [os.path.join(home, "bin", "nvcc"), "-cubin", "-arch=sm_90", *ptxas, str(src)]
    out = subprocess.run(cmd + ["-o", str(tmp_path / "k.cubin")], capture_output=True, text=True)
    if kernel == "clean":
        assert out.returncode == 0, out.stderr
    else:
        assert out.returncode != 0, f"{kernel} compiled despite the gate:\n{out.stderr}"
        want = "Registers are spilled" if kernel == "spill" else "Local memory used"
        assert want in out.stderr, out.stderr


@needs_ext
def test_extension_shares_the_processes_libstdcxx():
    """gtp_kernels._C must use the libstdc++ torch uses (a dynamic libstdc++.so.6), not a copy of
    its own: a build whose compiler linked libstdc++'s stream code into the extension (seen on
    a GPU machine's image: std::ostream and locale facets resolved inside _C.so) crashed with a
    segmentation fault on the first error message, CPU and CUDA alike, while every correct
    input worked."""
    import shutil

    found = glob.glob(os.path.join(ROOT, "gtp_kernels", "_C*.so"))
    if not found or shutil.which("readelf") is None or shutil.which("nm") is None:
        pytest.skip("no built extension, or no binutils to read it")
    so = found[0]
    dynamic = subprocess.run(["readelf", "-d", so], capture_output=True, text=True).stdout
    assert "libstdc++.so" in dynamic, "the extension does not load libstdc++ dynamically"
    symbols = subprocess.run(
        ["nm", "-C", "--defined-only", so], capture_output=True, text=True
    ).stdout
    own = [line for line in symbols.splitlines() if "std::codecvt" in line or "locale::" in line]
    assert not own, f"libstdc++ internals defined inside the extension: {own[:3]}"


def test_build_info_reports_openmp():
    from gtp_kernels import _C

    info = _C.build_info()
    assert info["torch_version"] == torch.__version__.split("+")[0]
    assert info["openmp"], "built without OpenMP: at::parallel_for would run on one thread"


def _info_output(**env) -> str:
    return subprocess.run(
        [sys.executable, "-m", "gtp_kernels.info"],
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ, PYTHONPATH=ROOT, **env),
    ).stdout


def test_info_command_runs():
    out = _info_output()
    assert "| propagate |" in out and "torch" in out
    info = collect()
    assert set(info["kernels"]) == set(OPS)
    # The Triton column: what is registered in torch.ops.gtp_triton, op by op.
    try:
        import gtp_kernels.triton as gt

        triton_ops = set(gt.OPS)
    except ImportError:
        triton_ops = set()
    for op in OPS:
        registered = hasattr(torch.ops.gtp_triton, op) if triton_ops else False
        assert info["kernels"][op]["Triton"] == registered == (op in triton_ops), op
        row = next(line for line in out.splitlines() if line.startswith(f"| {op} |"))
        assert row.rstrip().endswith("| yes |" if op in triton_ops else "| - |"), row
    # Where they run in this process (the main test invocation: no interpreter).
    if not triton_ops:
        assert info["triton_runs"].startswith("nowhere: gtp_kernels.triton does not import")
    elif torch.cuda.is_available():
        assert info["triton_runs"].startswith("on CUDA tensors")
    else:
        assert info["triton_runs"].startswith("nowhere in this process: ")
        assert "no GPU" in info["triton_runs"] and "TRITON_INTERPRET=1" in info["triton_runs"]
    assert f"Triton kernels run {info['triton_runs']}." in out


def test_info_under_the_triton_interpreter():
    pytest.importorskip("triton", reason="triton is not installed")
    out = _info_output(TRITON_INTERPRET="1")
    assert "Triton kernels run on CPU tensors, under the Triton interpreter" in out


def test_missing_backend_error_says_how_to_fix():
    from gtp_kernels.ops import resolve_backend

    # This process runs without the Triton interpreter: CPU tensors get the how-to.
    with pytest.raises(RuntimeError, match="Triton backend runs on CUDA tensors.*TRITON_INTERPRET"):
        resolve_backend("select_tokens", "triton", torch.device("cpu"))
    with pytest.raises(RuntimeError, match="needs tensors on cuda"):
        resolve_backend("propagate", "cuda", torch.device("cpu"))
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("propagate", "gpu", torch.device("cpu"))
