"""Every GroupNorm of one 100-row UNet forward (batch 50 with guidance) as the fastest configuration runs it: each
ResNet block's two norms as fp8_convs' framed e4m3 write (group_norm_framed_fp8, the second with its shift), each
transformer's input norm in bf16 (group_norm) and as fp8_projections writes it (group_norm_fp8). Per shape: calls per
forward, ms per call (the op as the blocks call it: its allocations and every kernel), TB/s on the bytes it must move
(the input read twice, the output written once) and ms per forward; then the sums, against the 39 ms of GroupNorm
kernels in session 19's profile of the whole forward, and one call's GPU kernels at the largest shape. Run on a GPU
node:
  python3 benchmarks/group_norm_forward_h200.py
"""
from __future__ import annotations

import sys

import torch

from kernel_bench import gpu_ms, kernel_table

sys.path.insert(0, ".")
from sccsdxl import group_norm as G  # noqa: E402

ROWS = 100
# (pixels per side, channels, second norm of its block (with a shift), calls per forward): SDXL's ResNet blocks, the
# first norm of each up block's ResNet reading the skip concatenation
RESNET_NORMS = [(128, 320, False, 2), (128, 320, True, 5), (128, 960, False, 1), (128, 640, False, 2),
                (64, 320, False, 1), (64, 640, False, 1), (64, 640, True, 5), (64, 1920, False, 1),
                (64, 1280, False, 1), (64, 960, False, 1),
                (32, 640, False, 1), (32, 1280, False, 3), (32, 1280, True, 7), (32, 2560, False, 2),
                (32, 1920, False, 1)]
TRANSFORMER_NORMS = [(32, 1280, 6), (64, 640, 5)]  # (side, channels, transformers per forward)


def inputs(side: int, channels: int) -> tuple[torch.Tensor, torch.Tensor, torch.nn.GroupNorm]:
    norm = torch.nn.GroupNorm(32, channels, eps=1e-5).to("cuda", torch.bfloat16)
    x = torch.randn(ROWS, channels, side, side, device="cuda", dtype=torch.bfloat16)
    shift = torch.randn(ROWS, channels, device="cuda", dtype=torch.bfloat16)
    return x.contiguous(memory_format=torch.channels_last), shift, norm


def row(label: str, side: int, channels: int, count: int, out_bytes: int, call) -> tuple[str, float]:
    ms = gpu_ms(call, reps=20)
    moved = ROWS * side * side * channels * (2 * 2 + out_bytes)
    return (f"| {label} | {side}x{side}, {channels} ch | {count} | {ms:.3f} | {moved / ms / 1e9:.2f} | "
            f"{ms * count:.2f} |"), ms * count


def main() -> None:
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}\n")
    print("| norm | shape | calls per forward | ms per call | TB/s | ms per forward |\n|---|---|---|---|---|---|")
    totals = {"ResNet, framed e4m3": 0.0, "transformer, bf16": 0.0, "transformer, e4m3": 0.0}
    with torch.no_grad():
        for side, channels, second, count in RESNET_NORMS:
            x, shift, norm = inputs(side, channels)
            given = shift if second else None
            line, ms = row("ResNet " + ("second, shift" if second else "first"), side, channels, count, 1,
                           lambda: G.group_norm_framed_fp8(x, norm, given))
            totals["ResNet, framed e4m3"] += ms
            print(line, flush=True)
        for side, channels, count in TRANSFORMER_NORMS:
            x, _, norm = inputs(side, channels)
            for label, out_bytes, call in (("transformer, bf16", 2, lambda: G.group_norm(x, norm)),
                                           ("transformer, e4m3", 1, lambda: G.group_norm_fp8(x, norm))):
                line, ms = row(label, side, channels, count, out_bytes, call)
                totals[label] += ms
                print(line, flush=True)
    print("\n| norms | ms per forward |\n|---|---|")
    for label, ms in totals.items():
        print(f"| {label} | {ms:.2f} |")
    print(f"| ResNet + transformer in bf16 (as the fastest configuration) | "
          f"{totals['ResNet, framed e4m3'] + totals['transformer, bf16']:.2f} |")
    x, shift, norm = inputs(128, 960)
    print(f"\nResNet first norm, 128x128, 960 ch: one call's GPU kernels\n"
          f"{kernel_table(lambda: G.group_norm_framed_fp8(x, norm))}")


if __name__ == "__main__":
    main()
