"""sccsdxl.fused's LayerNorm + fp8 row kernel (option fused_norms) alone, on the transformer blocks' shapes at batch 25.

Times each configuration its autotuning chooses from and the autotuned call, with and without the residual add
before the norm, against the same work compiled by inductor (the add, torch's LayerNorm and torchao's per-row
quantization: what the kit compiles without fused_norms), with and without inductor's multi_kernel; GB/s counts
the bytes moved (read x, and the residual; write the sum, fp8 values and a scale per row). Run on a GPU node:
  python3 benchmarks/layer_norm_fp8_h200.py
"""
import sys

import torch

sys.path.insert(0, ".")
from sccsdxl import fused  # noqa: E402
from kernel_bench import bandwidth_row  # noqa: E402

SHAPES = {"1280 level (50 rows x 1024 tokens)": (51200, 1280), "640 level (50 rows x 4096 tokens)": (204800, 640)}


def inductor_path(with_residual: bool):
    """The unfused ops as one function for inductor to compile."""
    def add_norm_quantize(x, residual, norm):
        total = x + residual if with_residual else x
        return total, *fused.quantize_rows(norm(total))
    return add_norm_quantize


print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}\n")
print("| shape | residual add | work | ms | GB/s |\n|---|---|---|---|---|")
for name, (rows, width) in SHAPES.items():
    norm = torch.nn.LayerNorm(width).to("cuda", torch.bfloat16)
    x, residual = (torch.randn(rows, width, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    values = torch.empty(rows, width, device="cuda", dtype=fused.FP8)
    scales = torch.empty(rows, 1, device="cuda")
    total = torch.empty_like(x)
    for with_residual in (False, True):
        shape = f"{name} | {'yes' if with_residual else 'no'}"
        moved = rows * width * (7 if with_residual else 3) + rows * 4
        for config in fused._layer_norm_fp8_rows_kernel.configs:
            label = f"kernel, {config.kwargs['ROWS']} rows per program, {config.num_warps} warps"
            print(bandwidth_row(shape, label, lambda: fused.run_layer_norm_config(
                x, residual if with_residual else None, total, norm.weight, norm.bias, norm.eps, values, scales,
                rows=config.kwargs["ROWS"], num_warps=config.num_warps), moved, reps=50))
        op = (lambda: fused.add_layer_norm_fp8_rows(x, residual, norm)) if with_residual else \
            (lambda: fused.layer_norm_fp8_rows(x, norm))
        print(bandwidth_row(shape, lambda: f"kernel, autotuned: {fused._layer_norm_fp8_rows_kernel.best_config}", op,
                            moved, reps=50))
        for multi_kernel in (0, 1):
            torch._dynamo.reset()
            with torch._inductor.config.patch({"triton.multi_kernel": multi_kernel}), torch.no_grad():
                compiled = torch.compile(inductor_path(with_residual), fullgraph=True)
                print(bandwidth_row(shape, f"add, LayerNorm, torchao's quantization, inductor (multi_kernel={multi_kernel})",
                                    lambda: compiled(x, residual, norm), moved, reps=50))
