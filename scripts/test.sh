#!/usr/bin/env bash
# Set up, then: lint, build the standalone CMake library and run its ctest smoke test, run the
# Python test suite, the Triton kernels' tests under the Triton interpreter, then the op tests
# under ASan + UBSan (scripts/sanitize.sh). GTP_SKIP_CMAKE=1
# skips the CMake step, GTP_SKIP_SANITIZE=1 the sanitizer run.
# The CMake build also makes the AOTInductor C++ runner build/cmake/gtp_aoti_run, which
# tests/test_export_aoti.py runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

echo "[test] ruff"
.venv/bin/ruff check gtp_kernels tests benchmarks setup.py
.venv/bin/ruff format --check gtp_kernels tests benchmarks setup.py

if [ "${GTP_SKIP_CMAKE:-0}" != "1" ]; then
  echo "[test] CMake build + ctest"
  mkdir -p build
  # The CUDA kernels were already compiled for sm_80 and sm_90 by setup.py (with the same
  # spill gate); CMake's own CUDA build proves the library builds and registers them, for one
  # architecture so that CI does not compile everything twice. GTP_CMAKE_CUDA_ARCHS overrides.
  cmake -S . -B build/cmake -DPython3_EXECUTABLE="$PWD/.venv/bin/python" \
    -DCMAKE_CUDA_ARCHITECTURES="${GTP_CMAKE_CUDA_ARCHS:-90}" > build/cmake.log 2>&1 ||
    { cat build/cmake.log; exit 1; }
  cmake --build build/cmake -j 2 >> build/cmake.log 2>&1 || { cat build/cmake.log; exit 1; }
  ctest --test-dir build/cmake --output-on-failure
fi

echo "[test] pytest"
GTP_REQUIRE_EXTENSION=1 .venv/bin/python -m pytest tests -q -ra --ignore=tests/triton_ops "$@"

# The Triton kernels on CPU tensors under the Triton interpreter: their own invocation, since
# the interpreter must be on before triton decorates the kernels (tests/triton_ops/conftest.py).
echo "[test] pytest, Triton kernels under TRITON_INTERPRET=1"
TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/triton_ops -q -ra "$@"

# The op tests against an ASan + UBSan build of the extension (its own build dir; about 4 min
# on an idle 2-core machine). GTP_SKIP_SANITIZE=1 skips it; only with no pytest arguments.
if [ "${GTP_SKIP_SANITIZE:-0}" != "1" ] && [ $# -eq 0 ]; then
  echo "[test] sanitizers (scripts/sanitize.sh)"
  bash scripts/sanitize.sh
fi
