"""sccsdxl.fused's LayerNorm + fp8 row kernel (option fused_norms) alone, on the transformer blocks' shapes at batch 25.

Times each configuration its autotuning chooses from (rows per program, warps, and the row padded to a power of two
or split into a head and a tail) and the autotuned call, with and without the residual add
before the norm, against the same work compiled by inductor (the add, torch's LayerNorm and torchao's per-row
quantization: what the kit compiles without fused_norms), with and without inductor's multi_kernel; GB/s counts
the bytes moved (read x, and the residual; write the sum, fp8 values and a scale per row). Run on a GPU node:
  python3 benchmarks/layer_norm_fp8_h200.py
"""
import sys

import torch

sys.path.insert(0, ".")
from sccsdxl import fused  # noqa: E402
from kernel_bench import BLOCK_ROWS, bandwidth_row, inductor_rows, print_row_table, whole_row_config_rows  # noqa: E402


def inductor_path(with_residual: bool):
    """The unfused ops as one function for inductor to compile."""
    def add_norm_quantize(x, residual, norm):
        total = x + residual if with_residual else x
        return total, *fused.quantize_rows(norm(total))
    return add_norm_quantize


print_row_table("| shape | residual add | work | ms | GB/s |")
for name, (rows, width) in BLOCK_ROWS.items():
    norm = torch.nn.LayerNorm(width).to("cuda", torch.bfloat16)
    x, residual = (torch.randn(rows, width, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    values = torch.empty(rows, width, device="cuda", dtype=fused.FP8)
    scales = torch.empty(rows, 1, device="cuda")
    total = torch.empty_like(x)
    for with_residual in (False, True):
        shape = f"{name} | {'yes' if with_residual else 'no'}"
        moved = rows * width * (7 if with_residual else 3) + rows * 4
        whole_row_config_rows(shape, fused._layer_norm_fp8_rows_kernel, lambda per_program, warps, split: (
            fused.run_layer_norm_config(x, residual if with_residual else None, total, norm.weight, norm.bias,
                                        norm.eps, values, scales, rows=per_program, num_warps=warps, split=split)),
                              moved)
        op = (lambda: fused.add_layer_norm_fp8_rows(x, residual, norm)) if with_residual else \
            (lambda: fused.layer_norm_fp8_rows(x, norm))
        print(bandwidth_row(shape, lambda: f"kernel, autotuned: {fused._layer_norm_fp8_rows_kernel.best_config}", op,
                            moved, reps=50))
        inductor_rows(shape, "add, LayerNorm, torchao's quantization", inductor_path(with_residual),
                      (x, residual, norm), moved)
