"""Where sccsdxl.group_norm's time goes: its statistics and normalizing kernels timed apart, over a wider range of
tiles, warps and statistics slices than the tuning tries, beside what the GPU moves for a plain copy (one read, one
write) and a plain channel sum (one read) of the same tensor. Session 10 measured the three kernels together at about
half of inductor's speed for the same work (BENCHMARKS.md); this says which kernel to change. Run on a GPU node:
  python3 benchmarks/group_norm_split_h200.py
"""
import sys

import torch
import triton

sys.path.insert(0, ".")
from sccsdxl import group_norm as G  # noqa: E402
from kernel_bench import bandwidth_row, print_row_table  # noqa: E402

ROWS = 50  # UNet rows: batch 25 with guidance
SHAPES = [("128x128, 320 ch", 128, 320), ("64x64, 640 ch", 64, 640), ("32x32, 1280 ch", 32, 1280)]


def statistics(x, per_slice: int, block_p: int, block_c: int, warps: int):
    """The statistics kernel alone, with ``per_slice`` pixels per program."""
    n, c, h, w = x.shape
    n_slices = triton.cdiv(h * w, per_slice)
    means = torch.empty((n, n_slices, c), device=x.device, dtype=torch.float32)
    m2s = torch.empty_like(means)
    grid = (n, n_slices, triton.cdiv(c, block_c))
    return lambda: G._slice_statistics_kernel.fn[grid](x, x, means, m2s, means, m2s, h * w, c, per_slice, n_slices,
                                                       HAS_SHIFT=False, EXTREMES=False, BLOCK_P=block_p,
                                                       BLOCK_C=block_c, num_warps=warps)


def normalizing(x, norm, out, block_p: int, block_c: int, warps: int):
    """The normalizing kernel alone (statistics made up: only its speed is read here)."""
    n, c, h, w = x.shape
    scale = torch.ones((n, c), device=x.device)
    offset = torch.zeros_like(scale)
    grid = (n, triton.cdiv(h * w, block_p), triton.cdiv(c, block_c))
    return lambda: G._normalize_kernel.fn[grid](x, scale, offset, out, scale, h * w, c, SILU=True, FP8_OUT=False,
                                                BLOCK_P=block_p, BLOCK_C=block_c, num_warps=warps)


print_row_table("| shape | work | ms | GB/s |")
for name, side, channels in SHAPES:
    norm = torch.nn.GroupNorm(32, channels).to("cuda", torch.bfloat16)
    x = torch.randn(ROWS, channels, side, side, device="cuda", dtype=torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    out = torch.empty_like(x)
    one_pass = x.numel() * 2
    print(bandwidth_row(name, "copy (read + write)", lambda: out.copy_(x), 2 * one_pass, reps=20))
    print(bandwidth_row(name, "channel sum, torch (read)", lambda: x.sum(dim=(2, 3)), one_pass, reps=20))
    per_slice_now, _ = G._slices(ROWS, side * side, channels)
    for slices_per_sm in (2, 8, 32):
        per_slice, _ = G._slices(ROWS, side * side, channels, slices_per_sm)
        for block_p, block_c, warps in ((32, 64, 4), (32, 128, 4), (64, 64, 4), (64, 128, 8), (128, 64, 8),
                                        (16, 256, 4), (32, 256, 8)):
            label = (f"statistics, {per_slice} pixels per slice ({slices_per_sm}/SM; now {per_slice_now}), "
                     f"tile ({block_p}, {block_c}), {warps} warps")
            print(bandwidth_row(name, label, statistics(x, per_slice, block_p, block_c, warps), one_pass, reps=20))
    for block_p, block_c, warps in ((32, 128, 4), (64, 64, 4), (64, 128, 4), (64, 128, 8), (128, 64, 4),
                                    (128, 128, 8), (16, 256, 4), (32, 256, 8), (256, 64, 8)):
        print(bandwidth_row(name, f"normalizing + SiLU, tile ({block_p}, {block_c}), {warps} warps",
                            normalizing(x, norm, out, block_p, block_c, warps), 2 * one_pass, reps=20))
