#!/usr/bin/env bash
# BENCHMARKS.md "Batch-size sweep and scaling": the 03_batch_size_sweep sweep from a shell on a GPU node.
# model_source synthetic (full-size SDXL, random weights: real compute), fp16: every batch size on one GPU,
# then the best batch size on 2 and 4 GPUs (torchrun, one replica per GPU). Run from the repo root:
#   bash benchmarks/sweep_h200.sh RESULTS_DIR
# Env: PYTHON (default python3), OUTPUT_DIR (runs and sweep state, default output/bench-sweep; running the
# script again with the same settings resumes: finished points are skipped), BATCH_SIZES (default
# 1,2,4,8,16,32), GPUS (default 1,2,4, capped at the GPUs present), VARIANT (default base), DTYPE (default fp16),
# OPTIMIZATIONS (default none, e.g. "fuse_qkv,compile").
set -euo pipefail
# Shared GPU hosts: NVLink multicast stays off (point-to-point transfers do not need it).
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}
results=${1:?usage: benchmarks/sweep_h200.sh RESULTS_DIR}
py=${PYTHON:-python3}
out=${OUTPUT_DIR:-output/bench-sweep}
variant=${VARIANT:-base}
dtype=${DTYPE:-fp16}
present=$($py -c "import torch; print(torch.cuda.device_count())")
gpus=${GPUS:-$($py -c "print(','.join(str(g) for g in (1, 2, 4) if g <= max($present, 1)))")}
mkdir -p "$results" "$out"
flags=(--variant "$variant" --model-source synthetic --dtype "$dtype" --device cuda --optimizations "${OPTIMIZATIONS:-}"
       --output-dir "$out")

set +e  # a failed or interrupted sweep still gets its table: every finished point is on disk
$py -m sccsdxl.sweep "${flags[@]}" --batch-sizes "${BATCH_SIZES:-1,2,4,8,16,32}" --gpus "$gpus" \
    2>&1 | tee "$results/sweep_h200.log"
status=${PIPESTATUS[0]}
set -e
$py -m sccsdxl.sweep "${flags[@]}" --report --table "$results/sweep_table.md" > /dev/null

{
    echo "## Batch-size sweep and scaling ($(date -u +%F), variant $variant, synthetic $dtype${OPTIMIZATIONS:+, $OPTIMIZATIONS})"
    echo
    $py -c "import torch, diffusers as d; n = torch.cuda.device_count(); g = torch.cuda.get_device_name(0) if n else '-';
print(f'{n}x {g}, torch {torch.__version__}, diffusers {d.__version__}')"
    echo
    cat "$results/sweep_table.md"
} > "$results/sweep_h200.md"
echo
cat "$results/sweep_h200.md"
exit "$status"
