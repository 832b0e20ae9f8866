"""sccsdxl.group_norm's kernels (option fused_group_norms) alone, at the UNet's GroupNorm shapes at batch 25.

Times the three kernels with the tuned configurations and with each configuration of each kernel that the tuning
chooses from, with and without the shift (a ResNet block's second norm: convolution bias plus time embedding) and SiLU,
against the same work compiled by inductor on channels_last input (the add, F.group_norm and F.silu: what the kit
compiles without the option), with and without inductor's multi_kernel. GB/s counts the bytes a GroupNorm must
move: the input read twice (statistics, then normalizing) and the output written once. Run on a GPU node:
  python3 benchmarks/group_norm_h200.py
"""
import sys

import torch

sys.path.insert(0, ".")
from sccsdxl import group_norm as G  # noqa: E402
from kernel_bench import bandwidth_row, inductor_rows, print_row_table  # noqa: E402

ROWS = 50  # UNet rows: batch 25 with guidance
# (level, pixels per side, channels): the GroupNorms that take the most bytes per forward (BENCHMARKS.md, session 9)
SHAPES = [("128x128, 320 ch", 128, 320), ("128x128, 960 ch (up, first ResNet)", 128, 960),
          ("64x64, 640 ch", 64, 640), ("64x64, 1920 ch (up, first ResNet)", 64, 1920),
          ("32x32, 1280 ch", 32, 1280), ("32x32, 2560 ch (up)", 32, 2560)]


print_row_table("| shape | shift, SiLU | work | ms | GB/s |")
for name, side, channels in SHAPES:
    norm = torch.nn.GroupNorm(32, channels).to("cuda", torch.bfloat16)
    x = torch.randn(ROWS, channels, side, side, device="cuda", dtype=torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    shift = torch.randn(ROWS, channels, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(x)
    moved = x.numel() * 2 * 3
    for with_shift, silu in ((False, False), (False, True), (True, True)):
        shape = f"{name} | {'shift' if with_shift else '-'}, {'SiLU' if silu else '-'}"
        given = shift if with_shift else None
        for stat, normalize in G.each_tuning_choice():  # (pixels, channels, warps) of each kernel
            print(bandwidth_row(shape, f"kernels, statistics {stat}, normalizing {normalize}",
                                lambda: G.run_group_norm_config(x, norm, given, silu, out, stat, normalize),
                                moved, reps=20))
        print(bandwidth_row(shape, lambda: (f"kernels, tuned: statistics {G._slice_statistics_kernel.best_config}, "
                                            f"normalizing {G._normalize_kernel.best_config}"),
                            lambda: G.group_norm(x, norm, given, silu), moved, reps=20))
        # the unfused ops, compiled by inductor
        inductor_rows(shape, "add, GroupNorm, SiLU", G.group_norm_reference, (x, norm, given, silu), moved)
