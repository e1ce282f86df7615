#!/usr/bin/env bash
# Set up, then: lint, build the standalone CMake library and run its ctest smoke test, and
# run the Python test suite. GTP_SKIP_CMAKE=1 skips the CMake step.
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
GTP_REQUIRE_EXTENSION=1 exec .venv/bin/python -m pytest tests -q -ra "$@"
