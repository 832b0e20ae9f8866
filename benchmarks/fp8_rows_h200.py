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
from kernel_bench import bandwidth_row  # noqa: E402

SHAPES = {"1280 level (50 rows x 1024 tokens)": (51200, 1280), "640 level (50 rows x 4096 tokens)": (204800, 640)}


print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}\n")
print("| shape | quantization | ms | GB/s |\n|---|---|---|---|")
for name, (rows, width) in SHAPES.items():
    matrix = torch.randn(rows, width, device="cuda", dtype=torch.bfloat16)
    values = torch.empty(rows, width, device="cuda", dtype=fused.FP8)
    scales = torch.empty(rows, 1, device="cuda")
    moved = rows * width * 3 + rows * 4
    for config in fused._fp8_rows_kernel.configs:
        label = f"kernel, {config.kwargs['ROWS']} rows per program, {config.num_warps} warps"
        print(bandwidth_row(name, label, lambda: fused.run_rows_config(
            matrix, values, scales, rows=config.kwargs["ROWS"], num_warps=config.num_warps), moved, reps=50))
    print(bandwidth_row(name, lambda: f"kernel, autotuned: {fused._fp8_rows_kernel.best_config}",
                        lambda: fused.fp8_rows(matrix), moved, reps=50))
    for multi_kernel in (0, 1):
        torch._dynamo.reset()
        with torch._inductor.config.patch({"triton.multi_kernel": multi_kernel}):
            compiled = torch.compile(fused.quantize_rows, fullgraph=True)
            print(bandwidth_row(name, f"torchao's primitives, inductor (multi_kernel={multi_kernel})",
                                lambda: compiled(matrix), moved, reps=50))
