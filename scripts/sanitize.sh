#!/usr/bin/env bash
# The op tests against a copy of gtp_kernels._C built with AddressSanitizer + UndefinedBehavior-
# Sanitizer (float-cast-overflow on, every report fatal). The copy lives in build/sanitize/ (its
# own object files, its own package tree): the normal in-place build is not touched.
#
#   bash scripts/sanitize.sh [pytest args]      # default: the op tests and a tenth of the fuzzer
#
# Assumes scripts/setup.sh has run (.venv with torch). Sanitizer options, each one explained:
#   LD_PRELOAD   libasan first, then libubsan: Python and torch are not instrumented, so the ASan
#                runtime must be loaded before any library (ASan refuses to start otherwise) and
#                both runtimes must be present when _C is dlopen'ed.
#   detect_leaks=0   LeakSanitizer would report everything CPython and torch keep until exit
#                (interned objects, the dispatcher's registrations, thread pools); none of that
#                is our code, whose allocations are all RAII (at::Tensor, std::vector, unique_ptr).
#   No other suppression: every ASan or UBSan report stops the run with a non-zero exit code
#   (-fno-sanitize-recover=all, halt_on_error=1).
set -euo pipefail
cd "$(dirname "$0")/.."
out=build/sanitize
cxx=${CXX:-c++}
mkdir -p "$out"

echo "[sanitize] building gtp_kernels._C with -fsanitize=address,undefined into $out"
start=$(date +%s)
if ! GTP_SANITIZE=address,undefined .venv/bin/python setup.py build_ext \
    --build-temp "$out/temp" --build-lib "$out/lib" > "$out/build.log" 2>&1; then
  cat "$out/build.log"
  echo "[sanitize] build failed (log above, also in $out/build.log)"
  exit 1
fi
grep "\[gtp_kernels build\] sanitizers" "$out/build.log"
# A package tree of its own: this checkout's Python sources plus the sanitized _C.
rm -rf "$out/site" && mkdir -p "$out/site"
tar --exclude='*.so' --exclude='__pycache__' -cf - gtp_kernels | tar -xf - -C "$out/site"
cp "$out"/lib/gtp_kernels/_C*.so "$out/site/gtp_kernels/"
echo "[sanitize] built in $(( $(date +%s) - start )) s"

asan=$("$cxx" -print-file-name=libasan.so)
ubsan=$("$cxx" -print-file-name=libubsan.so)
for lib in "$asan" "$ubsan"; do
  [ -e "$lib" ] || { echo "[sanitize] $lib not found (install the compiler's sanitizer runtimes)"; exit 1; }
done
export LD_PRELOAD="$asan:$ubsan"
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export PYTHONPATH="$PWD/$out/site"
export GTP_REQUIRE_EXTENSION=1
export GTP_FUZZ_SCALE=${GTP_FUZZ_SCALE:-0.1}  # a tenth of the fuzzer's cases (>= 1,200)
export GTP_FUZZ_TRITON_CASES=0  # the Triton interpreter runs no code of ours in C++
# -P: no current directory on sys.path, so the in-place build cannot shadow the sanitized one.
.venv/bin/python -P -c "
import gtp_kernels._extension as e, sys
assert e.extension_available(), e.extension_error()
path = e._C.__file__
assert '/build/sanitize/site/' in path, path
print('[sanitize] testing', path)"
if [ $# -eq 0 ]; then
  set -- tests/test_attention.py tests/test_build_graph.py tests/test_select_tokens.py \
    tests/test_propagate.py tests/test_nonfinite.py tests/test_zero_sized.py tests/test_determinism.py tests/test_fuzz.py
fi
start=$(date +%s)
# --capture=sys: pytest captures Python's output only, so a report the sanitizer writes to the
# stderr file descriptor before it stops the process is shown, not swallowed.
if ! .venv/bin/python -P -m pytest -q -p no:cacheprovider --capture=sys "$@"; then
  echo "[sanitize] FAILED (a sanitizer report, if any, is above)"
  exit 1
fi
echo "[sanitize] clean: no ASan / UBSan report ($(( $(date +%s) - start )) s of tests)"
