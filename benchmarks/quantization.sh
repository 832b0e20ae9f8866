#!/usr/bin/env bash
# BENCHMARKS.md "Quantization": 04_quantization run headless with model_source synthetic (full-size SDXL,
# random weights: real compute; the guard's verdicts are meaningless and no CLIP model is loaded).
# Run from the repo root on a GPU node:
#   bash benchmarks/quantization.sh RESULTS_DIR "['fp16:', 'bf16:compile,fp8']" [BATCH] [VARIANT]
# Each configuration: fresh pipeline, first call (compile), one loadgen Offline performance run.
set -euo pipefail
results=${1:?usage: benchmarks/quantization.sh RESULTS_DIR CONFIGS_YAML_LIST [BATCH] [VARIANT]}
configs=${2:?a YAML list of configurations, e.g. "['fp16:', 'bf16:compile,fp8']"}
batch=${3:-8}; variant=${4:-base}
runs=${RUNS_DIR:-bench-runs/quantization}
mkdir -p "$results" "$runs"
papermill notebooks/04_quantization.ipynb "$results/04_quantization.ipynb" \
  -p model_source synthetic -p metric_models none -p variant "$variant" -p batch_size "$batch" \
  -p output_dir "$runs" -p show_progress False -y "configs: $configs"
python3 benchmarks/summarize_quant.py "$runs/quantization" > "$results/quantization.md"
cat "$results/quantization.md"
