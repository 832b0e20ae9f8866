"""BENCHMARKS.md "One-pass GEGLU + fp8": sccsdxl.fused's kernel alone on the two SDXL feed-forward shapes at batch 25.

Times the fused GEGLU + per-row fp8 quantization (eager, after its autotuning) against the unfused torch
definition, and prints the chosen Triton config and the bytes moved per second. Run on a GPU node:
  python3 benchmarks/fused_geglu_h200.py
"""
import sys

import torch

sys.path.insert(0, ".")
from sccsdxl import fused  # noqa: E402

SHAPES = {"1280 level (50 rows x 1024 tokens)": (51200, 10240), "640 level (50 rows x 4096 tokens)": (204800, 5120)}


def gpu_ms(fn, reps: int = 20) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}")
print("| shape | fused ms | GB/s | unfused ms | config |")
for name, (rows, width) in SHAPES.items():
    hidden = torch.randn(rows, width, device="cuda", dtype=torch.bfloat16)
    fused_ms = gpu_ms(lambda: fused.geglu_fp8_rows(hidden))
    moved = rows * width * 2 + rows * width // 2 + rows * 4
    unfused_ms = gpu_ms(lambda: fused.geglu_fp8_rows_reference(hidden), reps=3)
    best = getattr(fused._geglu_fp8_rows_kernel, "best_config", None)
    print(f"| {name} | {fused_ms:.3f} | {moved / fused_ms / 1e6:.0f} | {unfused_ms:.3f} | {best} |")
