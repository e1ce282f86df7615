#!/usr/bin/env bash
# Everything a machine with an NVIDIA GPU can tell about this repository, in one run of at most
# 8 minutes, written to one markdown report (benchmarks/gpu_report.md):
#
#   bash benchmarks/gpu_check.sh                      # every step, then the report
#   bash benchmarks/gpu_check.sh --report LOGDIR OUT  # only (re)write a report from a run's logs
#
# Steps, in this order, each under its own `timeout` and all inside the total budget
# (GTP_GPU_CHECK_BUDGET seconds, default 480); a step that fails or times out is recorded and
# the next one runs; a step with no time left is recorded as skipped:
#   1. nvidia-smi; build gtp_kernels._C with its CUDA kernels for this GPU's architecture
#      (TORCH_CUDA_ARCH_LIST, default: the GPU's compute capability; GTP_BUILD_CUDA=1, so a
#      build without CUDA kernels fails), in the background while
#   2. tests/triton_ops runs on CUDA tensors (no compiled extension needed); then
#      python -m gtp_kernels.info and the CUDA tests: tests/test_cuda.py,
#      tests/test_determinism.py, tests/test_export.py (pytest-xdist when installed)
#   3. the device's measured ceilings (copy, float16 GEMM) and the microbenchmarks on CUDA:
#      float16, DeiT-B shapes (H=12, d=64, C=768, N=197), batch 256, providers cuda / triton /
#      reference and, for attention, PyTorch SDPA (FlashAttention)
#   4. end to end: bench_timm.py, DeiT-S and DeiT-B, float16, batch 256, patched (cuda, triton,
#      reference) vs timm's unpatched model
#   5. tests/test_cuda.py under compute-sanitizer memcheck and racecheck, on a subset (the
#      slowest steps: they get whatever time is left; PYTORCH_NO_CUDA_MEMORY_CACHING=1 so that
#      the caching allocator does not hide out-of-bounds accesses)
#
# Python: $PYTHON if set; else ./.venv/bin/python if it exists; else a python3 whose torch sees
# a GPU (GPU images ship one, and no package registry is needed); else scripts/setup.sh creates
# ./.venv (it needs the package registries). Logs go to build/gpu_check/ (GTP_GPU_CHECK_LOGS).
set -u
cd "$(dirname "$0")/.." || exit 1

BUDGET=${GTP_GPU_CHECK_BUDGET:-480}
LOGDIR=${GTP_GPU_CHECK_LOGS:-build/gpu_check}
REPORT=${GTP_GPU_CHECK_REPORT:-benchmarks/gpu_report.md}
RESERVE=10 # seconds kept for writing the report
TAIL=40    # log lines a report shows for a test step or a failed step

# --------------------------------------------------------------------------------- report

# A step's record in LOGDIR: NN-name.cmd (the command), .kind (what of its log the report
# shows: tables | tail | text), .status (ok | failed (exit N) | timed out ... | skipped: ...),
# .secs, .log (stdout and stderr).

# The report's part of one step's log, by kind.
step_output() {
  local kind=$1 log=$2 status=$3
  if [ "$kind" = tables ] && [ "$status" = ok ]; then
    # The markdown tables and the '#' lines that say what they measured: "# text" as a list
    # item, a "### heading" one level below the step's; a blank line between blocks.
    awk '
      function emit(kind, text) {
        if (n && (gap || kind != last)) print ""
        print text; last = kind; gap = 0; n++
      }
      /^\|/ { emit("table", $0); next }
      /^# / { emit("note", "- " substr($0, 3)); next }
      /^#/ { emit("heading", "#" $0); next }
      { gap = 1 }' "$log"
  elif [ "$kind" = text ] && [ "$status" = ok ]; then
    printf '```\n'
    cat "$log"
    printf '```\n'
  else
    printf '```\n'
    tail -n "$TAIL" "$log"
    printf '```\n'
  fi
}

write_report() {
  local logs=$1 out=$2 base name status secs total=0 failed=0
  {
    printf '# GPU check report\n\n'
    if [ -f "$logs/header" ]; then
      cat "$logs/header"
      printf '\n'
    fi
    printf '| step | status | seconds |\n|---|---|---|\n'
    for base in "$logs"/[0-9][0-9]-*.cmd; do
      [ -e "$base" ] || continue
      base=${base%.cmd}
      name=${base##*/}
      status=$(cat "$base.status" 2> /dev/null || echo "no status (interrupted?)")
      secs=$(cat "$base.secs" 2> /dev/null || echo 0)
      total=$((total + secs))
      case $status in ok | skipped*) ;; *) failed=$((failed + 1)) ;; esac
      printf '| %s | %s | %s |\n' "$name" "$status" "$secs"
    done
    printf '\n%s s in the steps; %s step(s) failed or timed out.\n' "$total" "$failed"
    for base in "$logs"/[0-9][0-9]-*.cmd; do
      [ -e "$base" ] || continue
      base=${base%.cmd}
      status=$(cat "$base.status" 2> /dev/null || echo "no status (interrupted?)")
      printf '\n## %s: %s (%s s)\n\n' "${base##*/}" "$status" "$(cat "$base.secs" 2> /dev/null || echo 0)"
      # shellcheck disable=SC2016  # the backquotes are markdown, not a command substitution
      printf '`%s`\n\n' "$(cat "$base.cmd")"
      case $status in
        skipped*) ;;
        *) step_output "$(cat "$base.kind")" "$base.log" "$status" ;;
      esac
    done
  } > "$out"
}

if [ "${1:-}" = --report ]; then
  if [ $# -ne 3 ]; then
    echo "usage: bash benchmarks/gpu_check.sh --report LOGDIR OUT" >&2
    exit 2
  fi
  write_report "$2" "$3"
  exit 0
fi

# ---------------------------------------------------------------------------------- steps

START=$SECONDS
STEP=1
rm -rf "$LOGDIR"
mkdir -p "$LOGDIR"

# step NAME KIND CAP COMMAND...: run COMMAND under `timeout` for at most CAP seconds, or what
# is left of the budget, and record it.
step() {
  local name=$1 kind=$2 cap=$3
  shift 3
  local base left limit t0 rc
  base=$LOGDIR/$(printf '%02d' "$STEP")-$name
  STEP=$((STEP + 1))
  left=$((BUDGET - (SECONDS - START) - RESERVE))
  limit=$((cap < left ? cap : left))
  printf '%s\n' "$*" > "$base.cmd"
  printf '%s\n' "$kind" > "$base.kind"
  : > "$base.log"
  if [ "$limit" -lt 10 ]; then
    echo "skipped: out of time (${left} s of the ${BUDGET} s budget left)" > "$base.status"
    echo 0 > "$base.secs"
    echo "[gpu_check] $name: skipped, out of time"
    return 0
  fi
  echo "[gpu_check] $name (at most ${limit} s): $*"
  t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$base.log" 2>&1
  rc=$?
  echo $((SECONDS - t0)) > "$base.secs"
  case $rc in
    0) echo ok ;;
    124 | 137) echo "timed out after ${limit} s" ;;
    *) echo "failed (exit $rc)" ;;
  esac > "$base.status"
  echo "[gpu_check] $name: $(cat "$base.status") in $(cat "$base.secs") s"
  return 0
}

# skip NAME REASON: record a step that cannot run here.
skip() {
  local base
  base=$LOGDIR/$(printf '%02d' "$STEP")-$1
  STEP=$((STEP + 1))
  echo "-" > "$base.cmd"
  echo tail > "$base.kind"
  echo "skipped: $2" > "$base.status"
  echo 0 > "$base.secs"
  : > "$base.log"
  echo "[gpu_check] $1: skipped, $2"
}

export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
  SETUP=(build)
elif [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
  SETUP=(bash scripts/setup.sh)
elif python3 -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2> /dev/null; then
  PY=python3
  SETUP=(build)
else
  PY=.venv/bin/python
  SETUP=(bash scripts/setup.sh)
fi
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2> /dev/null | head -n 1)
  [ -n "$cap" ] && export TORCH_CUDA_ARCH_LIST=$cap
fi
export GTP_BUILD_CUDA=${GTP_BUILD_CUDA:-1}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

build() {
  # A gtp_kernels/_C*.so that is a symbolic link is a build shared with another checkout (a
  # git worktree): building here would write through the link. Say so and use it as it is.
  local so
  for so in gtp_kernels/_C*.so; do
    if [ -L "$so" ]; then
      echo "$so is a link to $(readlink "$so"), a build shared with another checkout: not" \
        "rebuilding through it (remove the link to build this checkout's own)"
      return 1
    fi
  done
  "$PY" setup.py build_ext --inplace
}
export -f build
export PY

{
  printf -- '- date: %s\n' "$(date -u '+%Y-%m-%d %H:%M UTC')"
  printf -- '- git: %s\n' "$(git rev-parse --short HEAD 2> /dev/null || echo unknown)"
  printf -- '- GPU: %s\n' "$(nvidia-smi --query-gpu=name,driver_version,memory.total \
    --format=csv,noheader 2> /dev/null || echo 'nvidia-smi failed')"
  printf -- '- python: %s; setup: %s; TORCH_CUDA_ARCH_LIST=%s\n' "$PY" "${SETUP[*]}" \
    "${TORCH_CUDA_ARCH_LIST:-unset}"
  printf -- '- budget: %s s\n' "$BUDGET"
} > "$LOGDIR/header"

FP16_DEIT_B=(--device cuda --dtype float16 --batch 256)

# pytest-xdist, when installed, runs the GPU tests on several processes: most of their time is
# compiling (Triton's JIT, torch.compile), which the GPU machine's cores share.
XDIST=()
if "$PY" -c 'import xdist' 2> /dev/null; then
  XDIST=(-n "$(($(nproc) < 8 ? $(nproc) : 8))")
fi

step nvidia-smi text 20 nvidia-smi
# The extension builds (nvcc) in the background while the Triton tests run: they need no
# compiled extension, and GTP_LOAD_EXTENSION=0 keeps them from loading a half-written one.
if [ "${SETUP[0]}" = build ]; then
  step build tail 300 bash -c build &
else
  step setup tail 300 "${SETUP[@]}" &
fi
BUILD_PID=$!
STEP=$((STEP + 1)) # the background step took this number
step triton-tests tail 200 env GTP_LOAD_EXTENSION=0 "$PY" -m pytest tests/triton_ops -q -rfEs \
  -p no:cacheprovider "${XDIST[@]}"
wait "$BUILD_PID"
step info text 30 "$PY" -m gtp_kernels.info
step cuda-tests tail 150 "$PY" -m pytest tests/test_cuda.py tests/test_determinism.py \
  tests/test_export.py -q -rfEs -p no:cacheprovider "${XDIST[@]}"
step ceilings tables 30 "$PY" benchmarks/ceiling.py --device cuda --dtype float16 --rounds 5
step bench-attention tables 60 "$PY" benchmarks/bench_attention.py "${FP16_DEIT_B[@]}" \
  --heads 12 --dim 64 --tokens 197 --rounds 5
step bench-propagate tables 40 "$PY" benchmarks/bench_propagate.py "${FP16_DEIT_B[@]}" \
  --channels 768 --rounds 7
step bench-build-graph tables 50 "$PY" benchmarks/bench_build_graph.py "${FP16_DEIT_B[@]}" \
  --channels 768 --model deit_base_patch16_224 --rounds 5
for model in deit_small_patch16_224 deit_base_patch16_224; do
  step "timm-${model%%_patch*}" tables 75 "$PY" benchmarks/bench_timm.py "${FP16_DEIT_B[@]}" \
    --model "$model" --sparsity 0.6 1.0 --rounds 5 --warmup 2 --no-malloc-env
done

SANITIZER=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
if [ -x "$SANITIZER" ]; then
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1
  # (no --leak-check: PyTorch keeps tensors and its CUDA context alive until exit)
  step memcheck tail 90 "$SANITIZER" --tool memcheck --error-exitcode 1 \
    "$PY" -m pytest tests/test_cuda.py -q -x -p no:cacheprovider \
    -k "select_tokens_samples or build_graph_samples or propagate_samples or (attention_samples and tiny)"
  step racecheck tail 90 "$SANITIZER" --tool racecheck --error-exitcode 1 \
    "$PY" -m pytest tests/test_cuda.py -q -x -p no:cacheprovider \
    -k "select_tokens_samples or build_graph_samples or (attention_samples and tiny) or (modes_and_engines and tiny)"
  unset PYTORCH_NO_CUDA_MEMORY_CACHING
else
  skip memcheck "compute-sanitizer not found (PATH, \$CUDA_HOME/bin)"
  skip racecheck "compute-sanitizer not found (PATH, \$CUDA_HOME/bin)"
fi

printf -- '- total: %s s of wall time\n' "$((SECONDS - START))" >> "$LOGDIR/header"
write_report "$LOGDIR" "$REPORT"
echo "[gpu_check] total $((SECONDS - START)) s (budget ${BUDGET} s); report: $REPORT"
