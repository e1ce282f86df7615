#!/usr/bin/env bash
# The main job: set up, then benchmark a GTP-patched DeiT-S against the unpatched model.
# Extra arguments go to the benchmark (see `.venv/bin/gtp-bench --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Steady-state glibc malloc (the benchmark also sets these itself if they are missing).
export MALLOC_MMAP_MAX_=${MALLOC_MMAP_MAX_:-0}
export MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-68719476736}
exec .venv/bin/python benchmarks/bench_timm.py "$@"
