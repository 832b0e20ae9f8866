"""BENCHMARKS.md "Batch 50, a fused GEGLU + fp8 kernel": sccsdxl.fused's kernel alone on the two SDXL feed-forward shapes at batch 25.

Times each strategy the kernel's autotuning chooses from (one row per program: one pass padded, one pass head +
tail, two passes over chunks; and since session 17 blocks of 2 or 4 rows per program, head + tail; several warp
counts), the autotuned call, and the unfused torch definition, with the bytes
moved per second (read 2n bf16, write n fp8 and a scale per row). Run on a GPU node:
  python3 benchmarks/fused_geglu_h200.py
"""
import sys

import torch

sys.path.insert(0, ".")
from sccsdxl import fused  # noqa: E402
from kernel_bench import BLOCK_ROWS, bandwidth_row, print_row_table  # noqa: E402

print_row_table("| shape | kernel | ms | GB/s |")
for name, (rows, block_width) in BLOCK_ROWS.items():
    width = 8 * block_width  # the GEGLU projection's output: value and gate, each 4x the block's width
    hidden = torch.randn(rows, width, device="cuda", dtype=torch.bfloat16)
    values = torch.empty(rows, width // 2, device="cuda", dtype=fused.FP8)
    scales = torch.empty(rows, 1, device="cuda")
    moved = rows * width * 2 + rows * width // 2 + rows * 4
    for config in fused._configs():
        print(bandwidth_row(name, f"{config.kwargs} num_warps {config.num_warps}", lambda: fused.run_strategy(
            hidden, values, scales, num_warps=config.num_warps, **config.kwargs), moved, reps=20))
    print(bandwidth_row(name, lambda: f"autotuned: {fused._geglu_fp8_rows_kernel.best_config}",
                        lambda: fused.geglu_fp8_rows(hidden), moved, reps=20))
    print(bandwidth_row(name, "unfused torch (eager)", lambda: fused.geglu_fp8_rows_reference(hidden), moved, reps=3))
