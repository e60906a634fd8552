#!/usr/bin/env bash
# The 20m/60m evidence on one accelerator: uniform vs alpha_hill vs relative (AdamW), each at
# its own best LR (x2 ladder, extended until interior), 3 seeds at the best, and the papers'
# speed-up (tokens to reach tuned uniform's final validation loss), through the same
# `python -m train.results` as docs/results.md. One page per preset: docs/results_<preset>.md
# (it names the device the runs ran on), its runs kept in docs/results_<preset>_runs/.
#
#   bash benchmarks/gpu_evidence.sh                 # 20m then 60m, runs cached in runs/gpu_evidence
#   PRESETS=20m SEEDS=2 bash benchmarks/gpu_evidence.sh /scratch/gpu_runs
#   PRESETS=20m WORKERS=6 DEADLINE=480 bash benchmarks/gpu_evidence.sh   # a time-boxed lease
#
# WORKERS: processes training side by side on the one device (default 1). A 20m step is far
#   too small to fill a modern GPU, so several runs share it; each process gets
#   0.75 / WORKERS of the device's memory (XLA_PYTHON_CLIENT_MEM_FRACTION, unless set): the
#   rest is for each process's CUDA context and kernels (8 workers at 0.9 / 8 ran out of
#   memory at start-up on an H200; the failed runs were retried by the other workers).
# CELLS: the cells to train (default the three above); PAGE_CELLS: those the page shows
#   (default CELLS), e.g. CELLS='muon/uniform,muon/alpha_hill' PAGE_CELLS='adamw/*,muon/*'.
# DEADLINE: seconds (from the script's start) after which no new run starts; GRACE seconds
#   later (default 90) the runs still training are stopped with SIGTERM (each saves a
#   checkpoint and is resumed by the next invocation that has the same run cache). The page
#   is then written from what is done.
#
# Cached and resumable like the CPU grid: run it again after an interruption and it trains
# only what is missing; the ledger (in git) also keeps the done runs for a machine without
# the cache. Measured on one H200 (2026-11-30): the 21 runs of the three 20m cells took
# 4.8 min with WORKERS=6 for the whole command (a run 0.3-1.4 min, the first ones compiling
# side by side); a 60m run is ~80x a 20m run's compute (5x the steps, 2x the batch, ~8x the
# FLOPs per token).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/gpu_evidence}
PRESETS=${PRESETS:-"20m 60m"}
SEEDS=${SEEDS:-3}
PYTHON=${PYTHON:-python}
WORKERS=${WORKERS:-1}
DEADLINE=${DEADLINE:-}
GRACE=${GRACE:-90}
CELLS=${CELLS:-adamw/uniform,adamw/alpha_hill,adamw/relative}
PAGE_CELLS=${PAGE_CELLS:-$CELLS}
# Checked here: bash arithmetic would read a word such as WORKERS=six as 0, silently.
for var in WORKERS SEEDS DEADLINE GRACE; do
  value=${!var}
  if [[ -n "$value" && ! "$value" =~ ^[0-9]+$ ]]; then
    echo "gpu_evidence.sh: $var must be a whole number, got '$value'" >&2; exit 2
  fi
done
if [[ "$WORKERS" -lt 1 ]]; then echo "gpu_evidence.sh: WORKERS must be >= 1" >&2; exit 2; fi

"$PYTHON" - <<'PY'
import sys
import jax
device = jax.devices()[0]
print(f"device: {device.platform} {device.device_kind} x {jax.device_count()}", flush=True)
if device.platform == "cpu":
    sys.exit("no accelerator found: these presets take hours per run on a CPU "
             "(set JAX_PLATFORMS or install jax[cuda12] / jax[tpu])")
PY

if [[ "$WORKERS" -gt 1 && -z "${XLA_PYTHON_CLIENT_MEM_FRACTION:-}" ]]; then
  # Each process would otherwise take 75% of the device's memory at its first allocation.
  export XLA_PYTHON_CLIENT_MEM_FRACTION
  XLA_PYTHON_CLIENT_MEM_FRACTION=$(awk "BEGIN { printf \"%.3f\", 0.75 / $WORKERS }")
fi

for preset in $PRESETS; do
  mkdir -p "$RUNS/$preset"
  stop_file="$RUNS/$preset/STOP"
  rm -f "$stop_file"
  pids=()
  for ((i = 1; i <= WORKERS; i++)); do
    # Workers share the run cache and the ledger; each picks a run no other is training.
    # Their own pages go beside the cache; the page in docs/ is written once, below.
    "$PYTHON" -m train.results --preset "$preset" --seeds "$SEEDS" --cells "$CELLS" \
      --page-cells "$PAGE_CELLS" --runs "$RUNS/$preset" --report "$RUNS/$preset/worker$i.md" \
      --ledger "docs/results_${preset}_runs" --stop-file "$stop_file" \
      > >(sed -u "s/^/[$preset w$i] /") 2>&1 &
    pids+=("$!")
    sleep 2   # staggered, so that the first runs are not all picked at the same instant
  done
  while kill -0 "${pids[@]}" 2>/dev/null; do   # while any worker is alive
    if [[ -n "$DEADLINE" && $SECONDS -ge $DEADLINE && ! -e "$stop_file" ]]; then
      echo "deadline (${DEADLINE} s): no new runs start" && touch "$stop_file"
    fi
    if [[ -n "$DEADLINE" && $SECONDS -ge $((DEADLINE + GRACE)) ]]; then
      echo "deadline + grace: stopping the runs in progress (resumable)"
      kill -TERM "${pids[@]}" 2>/dev/null || true
      break
    fi
    sleep 5
  done
  wait || true
  "$PYTHON" -m train.results --preset "$preset" --seeds "$SEEDS" --cells "$CELLS" \
    --page-cells "$PAGE_CELLS" --runs "$RUNS/$preset" --report "docs/results_$preset.md" \
    --ledger "docs/results_${preset}_runs" --report-only
  if [[ -e "$stop_file" ]]; then break; fi   # the deadline passed: no time for the next preset
done
