#!/usr/bin/env bash
# BENCHMARKS.md "Baseline": 02_baseline run headless, model_source synthetic (full-size SDXL, random
# weights: real compute), fp16, batch size 1 and 8, one GPU. Run from the repo root on a GPU node:
#   bash benchmarks/baseline.sh RESULTS_DIR [VARIANT]
# Env: BATCH_SIZES (default "1 8"), RUNS_DIR (default bench-runs/baseline).
set -euo pipefail
results=${1:?usage: benchmarks/baseline.sh RESULTS_DIR [VARIANT]}
variant=${2:-base}
runs=${RUNS_DIR:-bench-runs/baseline}
mkdir -p "$results" "$runs"
for bs in ${BATCH_SIZES:-1 8}; do
  papermill notebooks/02_baseline.ipynb "$results/02_baseline_bs${bs}.ipynb" \
    -p variant "$variant" -p model_source synthetic -p dtype fp16 -p batch_size "$bs" \
    -p output_dir "$runs" -p show_progress False -p image_grid 0
  python3 benchmarks/summarize_runs.py "$runs/runs" > "$results/baseline.md"  # after each point: partial results survive
done
cat "$results/baseline.md"
