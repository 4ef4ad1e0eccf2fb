#!/usr/bin/env bash
# The kernels' device check: their tests and their three benches on one GPU, in under 8 minutes,
# written to one Markdown file.
#
#   bash bench/kernel_check.sh [OUT_DIR]        # default OUT_DIR: bench/results
#   QUICK=1 bash bench/kernel_check.sh /tmp/kc  # the script's own dry run, on any machine: the
#                                               # lowering tests and the benches' --quick sizes
#
# Writes OUT_DIR/kernel_check.md: the environment (device, driver, jax), the summary of
# `pytest tests/kernels` (the TPU-style kernels excluded: off a TPU they run in interpret mode),
# then the tables of
#   MoDA     B1 Hq64 Hk8 d64 S64 bf16, T = 1K / 4K / 16K: MoDA, our flash, cuDNN, XLA (fwd, bwd)
#   lookup   N 1M, D 256, T 16K, k 16 and 64, bf16: XLA vs the kernel, GB/s and % of HBM peak
#   prefill  T = 16K / 64K / 128K, gamma 0.8 / 0.9 on the "long" structured inputs (calibrated
#            to ~84% sparsity at gamma 0.9, 64K), and random block sets at 75% / 95% sparsity:
#            cuDNN dense vs the block-sparse kernel, selection + kernel, measured density
# Each part runs under its own time limit, so one that hangs or dies costs only its own part;
# its output, and why it stopped, are in the file either way. Needs only jax, pytest and scipy
# (not the training stack). The targets it is read against are in kernels_pallas/README.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-bench/results}
mkdir -p "$OUT_DIR"
REPORT="$OUT_DIR/kernel_check.md"
LOG="$OUT_DIR/kernel_check.log"
: > "$LOG"

# part TITLE LIMIT_S COMMAND...: runs COMMAND under a time limit; its stdout goes in the report
# (as it is: the benches print Markdown), its stderr in the log.
part() {
  local title=$1 limit=$2
  shift 2
  echo "== $title" | tee -a "$LOG" >&2
  {
    echo
    echo "## $title"
    echo
    echo "\`$*\`"
    echo
  } >> "$REPORT"
  local start=$SECONDS
  timeout "$limit" "$@" >> "$REPORT" 2>> "$LOG"
  local rc=$?
  local why=""
  [ "$rc" -eq 124 ] && why=" (stopped at its ${limit} s limit)"
  [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && why=" (exit status $rc; the log has its errors)"
  printf '\n_%s: %d s%s_\n' "$title" $((SECONDS - start)) "$why" >> "$REPORT"
}

{
  echo "# Kernel check, $(date -u +%Y-%m-%d)"
  echo
  python - <<'PY'
import platform, jax
d = jax.devices()[0]
print(f"- device: {jax.device_count()} x {d.device_kind} ({jax.default_backend()})")
import jaxlib
print(f"- jax {jax.__version__}, jaxlib {jaxlib.__version__}, python {platform.python_version()}")
PY
  if command -v nvidia-smi > /dev/null; then
    echo "- driver: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -n 1)"
  fi
} > "$REPORT"

# -o addopts="": the suite's options ask for pytest-xdist, which a device image may lack
PYTEST=(python -m pytest -q -p no:cacheprovider -o addopts="" --no-header -rfs --tb=line)
if [ "${QUICK:-0}" = 1 ]; then
  part "tests/kernels (lowering only: QUICK)" 120 "${PYTEST[@]}" tests/kernels/test_lowering.py
  part "MoDA attention (quick)" 120 python -m kernels_pallas.moda.bench --quick
  part "memory lookup (quick)" 120 python -m kernels_pallas.memory_lookup.bench --quick \
    --repeats 1
  part "FlexPrefill (quick)" 120 python -m kernels_pallas.sparse_prefill.bench --quick \
    --gammas 0.9
else
  # limits: 180 + 120 + 45 + 120 s, under 8 minutes in all
  part "tests/kernels" 180 "${PYTEST[@]}" tests/kernels -k "not pallas_tpu"
  part "MoDA attention" 120 python -m kernels_pallas.moda.bench --seq 1024,4096,16384 --runs 5
  part "memory lookup" 45 python -m kernels_pallas.memory_lookup.bench --repeats 10
  part "FlexPrefill" 120 python -m kernels_pallas.sparse_prefill.bench \
    --seq-lens 16384,65536,131072 --gammas 0.8,0.9 --reps 3 --structure long
fi

echo "wrote $REPORT (errors, if any: $LOG)" >&2
