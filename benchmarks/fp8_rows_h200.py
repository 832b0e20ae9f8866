"""sccsdxl.fused's plain fp8 row kernel (option fp8_attn_out) alone, on the attention outputs' shapes at batch 25.

Times each configuration its autotuning chooses from, the autotuned call, and torchao's per-row quantization
compiled by inductor (what quant_all_linears runs for the same input), with and without inductor's
multi_kernel, with the bytes moved per second (read n bf16, write n fp8 and a scale per row). Run on a GPU node:
  python3 benchmarks/fp8_rows_h200.py
"""
import sys

import torch

sys.path.insert(0, ".")
from sccsdxl import fused  # noqa: E402
from kernel_bench import BLOCK_ROWS, bandwidth_row, inductor_rows, print_row_table, whole_row_config_rows  # noqa: E402

print_row_table("| shape | quantization | ms | GB/s |")
for name, (rows, width) in BLOCK_ROWS.items():  # the attention outputs
    matrix = torch.randn(rows, width, device="cuda", dtype=torch.bfloat16)
    values = torch.empty(rows, width, device="cuda", dtype=fused.FP8)
    scales = torch.empty(rows, 1, device="cuda")
    moved = rows * width * 3 + rows * 4
    whole_row_config_rows(name, fused._fp8_rows_kernel, lambda per_program, warps: fused.run_rows_config(
        matrix, values, scales, rows=per_program, num_warps=warps), moved)
    print(bandwidth_row(name, lambda: f"kernel, autotuned: {fused._fp8_rows_kernel.best_config}",
                        lambda: fused.fp8_rows(matrix), moved, reps=50))
    inductor_rows(name, "torchao's primitives", fused.quantize_rows, (matrix,), moved)
