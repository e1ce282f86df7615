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
# The editable install is redone when pyproject.toml changes (console scripts, metadata), but
# only for an install of this checkout: a .venv shared by several worktrees keeps pointing at
# the checkout it was installed from (run with PYTHONPATH=$PWD there).
pstamp=".venv/.gtp-pyproject-$(sha1sum pyproject.toml | cut -c1-12)"
installed_at=$({ .venv/bin/python -m pip show gtp_kernels 2>/dev/null || true; } |
  sed -n 's/^Editable project location: //p')
here=$(pwd -P)
[ -n "$installed_at" ] && installed_at=$(cd "$installed_at" 2> /dev/null && pwd -P || echo "$installed_at")
if ! .venv/bin/python -m pip show -q gtp_kernels > /dev/null 2>&1 ||
  { [ "$installed_at" = "$here" ] && [ ! -f "$pstamp" ]; }; then
  echo "[setup] installing gtp_kernels in editable mode (console scripts from pyproject.toml)"
  GTP_NO_EXTENSION=1 .venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
  rm -f .venv/.gtp-pyproject-* && touch "$pstamp"
elif [ -n "$installed_at" ] && [ "$installed_at" != "$here" ]; then
  echo "[setup] gtp_kernels is installed from $installed_at (a shared .venv): not reinstalled"
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
