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
echo "[setup] building gtp_kernels._C (pip install --no-build-isolation -e .)"
.venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
.venv/bin/python -m gtp_kernels.info
