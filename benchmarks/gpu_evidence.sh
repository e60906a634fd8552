#!/usr/bin/env bash
# The 20m/60m evidence on one accelerator: uniform vs alpha_hill vs relative (AdamW), each at
# its own best LR (x2 ladder, extended until interior), 3 seeds at the best, and the papers'
# speed-up (tokens to reach tuned uniform's final validation loss), through the same
# `python -m train.results` as docs/results.md. One page per preset: docs/results_<preset>.md
# (it names the device the runs ran on).
#
#   bash benchmarks/gpu_evidence.sh                 # 20m then 60m, runs cached in runs/gpu_evidence
#   PRESETS=20m SEEDS=2 bash benchmarks/gpu_evidence.sh /scratch/gpu_runs
#
# Cached and resumable like the CPU grid: run it again after an interruption and it trains
# only what is missing. Rough cost (not measured here: no accelerator was available): 20m is
# 2000 steps of 32 x 256 tokens per run, 60m 10000 steps of 64 x 256; about 8 runs per method.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/gpu_evidence}
PRESETS=${PRESETS:-"20m 60m"}
SEEDS=${SEEDS:-3}
PYTHON=${PYTHON:-python}

"$PYTHON" - <<'PY'
import sys
import jax
device = jax.devices()[0]
print(f"device: {device.platform} {device.device_kind} x {jax.device_count()}")
if device.platform == "cpu":
    sys.exit("no accelerator found: these presets take hours per run on a CPU "
             "(set JAX_PLATFORMS or install jax[cuda12] / jax[tpu])")
PY

for preset in $PRESETS; do
  "$PYTHON" -m train.results --preset "$preset" --seeds "$SEEDS" \
    --cells adamw/uniform,adamw/alpha_hill,adamw/relative \
    --page-cells adamw/uniform,adamw/alpha_hill,adamw/relative \
    --runs "$RUNS/$preset" --report "docs/results_$preset.md"
done
