#!/usr/bin/env bash
# Create (or reuse) ./.venv, install torch/timm and the test tools, and build gtp_kernels._C
# against the installed torch. Safe to run again: installs are skipped when requirements.txt
# has not changed, the extension build is incremental (ninja).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
  { echo "gtp_kernels needs Python >= 3.10 (PYTHON=$PYTHON)"; exit 1; }

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.gtp-requirements-$(sha1sum requirements.txt | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing requirements.txt into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt
  rm -f .venv/.gtp-requirements-* && touch "$stamp"
fi
if ! .venv/bin/python -m pip show -q gtp_kernels > /dev/null 2>&1; then
  echo "[setup] installing gtp_kernels in editable mode"
  GTP_NO_EXTENSION=1 .venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
fi
# Same build as `pip install --no-build-isolation -e .`, but in ./build so ninja rebuilds only
# what changed.
echo "[setup] building gtp_kernels._C in place"
mkdir -p build
if ! .venv/bin/python setup.py build_ext --inplace > build/ext.log 2>&1; then
  cat build/ext.log
  echo "[setup] building the extension failed (full log above, also in build/ext.log)"
  exit 1
fi
grep "\[gtp_kernels build\]" build/ext.log
.venv/bin/python -m gtp_kernels.info
