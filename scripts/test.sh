#!/usr/bin/env bash
# Set up, then: lint, build the standalone CMake library and run its ctest smoke test, and
# run the Python test suite. GTP_SKIP_CMAKE=1 skips the CMake step. The CMake build also makes
# the AOTInductor C++ runner build/cmake/gtp_aoti_run, which tests/test_export_aoti.py runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

echo "[test] ruff"
.venv/bin/ruff check gtp_kernels tests benchmarks setup.py
.venv/bin/ruff format --check gtp_kernels tests benchmarks setup.py

if [ "${GTP_SKIP_CMAKE:-0}" != "1" ]; then
  echo "[test] CMake build + ctest"
  mkdir -p build
  cmake -S . -B build/cmake -DPython3_EXECUTABLE="$PWD/.venv/bin/python" > build/cmake.log 2>&1 ||
    { cat build/cmake.log; exit 1; }
  cmake --build build/cmake -j 2 >> build/cmake.log 2>&1 || { cat build/cmake.log; exit 1; }
  ctest --test-dir build/cmake --output-on-failure
fi

echo "[test] pytest"
GTP_REQUIRE_EXTENSION=1 exec .venv/bin/python -m pytest tests -q -ra "$@"
