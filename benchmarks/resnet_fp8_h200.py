"""Would an fp8 convolution pay once its input is made in fp8 where it is normalized?

A ResNet block's GroupNorm + SiLU + 3x3 convolution at the UNet's shapes (50 rows: batch 25 with guidance), three
ways:
  kit          inductor's code for the shift, GroupNorm and SiLU, then cuDNN's bf16 convolution (what runs today)
  bf16 norms   sccsdxl.group_norm's kernels writing bf16, then cuDNN (option fused_group_norms)
  fp8          the same kernels writing e4m3 with one scale, then conv_fp8_h200.py's implicit-GEMM convolution
               (weights e4m3 with a scale per output channel)
Session 5 timed that convolution alone at 1.1-1.3x cuDNN's bf16 speed, a gain its input's separate quantization
ate (BENCHMARKS.md); here the quantization is part of the norm, which writes half the bytes. The fp8 scale is the
amax of the normalized output measured once beforehand, as a static calibration would set it; how the kit would
get it is the next question if this pays. Errors are against the kit's ops in bf16. Run on a GPU node:
  python3 benchmarks/resnet_fp8_h200.py            # or --interpret on a CPU: tiny shapes, correctness only
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import conv_fp8_h200 as conv  # switches Triton's interpreter on first under --interpret
from kernel_bench import FP8, FP8_MAX, gpu_ms, relative_error, run_experiment

sys.path.insert(0, ".")
from sccsdxl import group_norm as G  # noqa: E402

# (name, rows, pixels per side, in channels, out channels, shift): the shift is a second norm's (the first
# convolution's bias plus the time embedding); the first norm of an up block's first ResNet has none
SHAPES = [("1280 level, 1280->1280, norm2", 50, 32, 1280, 1280, True),
          ("1280 level up, 2560->1280, norm1", 50, 32, 2560, 1280, False),
          ("640 level, 640->640, norm2", 50, 64, 640, 640, True),
          ("640 level up, 1920->640, norm1", 50, 64, 1920, 640, False),
          ("320 level, 320->320, norm2", 50, 128, 320, 320, True),
          ("320 level up, 960->320, norm1", 50, 128, 960, 320, False)]
TINY = [("tiny, shift", 2, 6, 64, 32, True), ("tiny, no shift", 2, 5, 96, 64, False)]
FIXED = {"stat": (8, 64), "normalize": (8, 64), "conv": {"BM": 16, "BN": 16, "BK": 32, "GROUP_M": 2}}


def case(rows, size, c_in, c_out, with_shift, device):
    """A norm with its affine away from 1 / 0, an input like a convolution's output, the convolution's weights."""
    norm = torch.nn.GroupNorm(32, c_in).to(device, torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(c_in) + 0.5)
        norm.bias.copy_(torch.randn(c_in) * 0.1)
    x = (torch.randn(rows, c_in, size, size, device=device) * 2 + 1).to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    shift = torch.randn(rows, c_in, device=device, dtype=torch.bfloat16) if with_shift else None
    weight = (torch.randn(c_out, c_in, 3, 3, device=device) * (2 / (c_in * 9)) ** 0.5).to(torch.bfloat16)
    bias = (torch.randn(c_out, device=device) * 0.1).to(torch.bfloat16)
    return norm, x, shift, weight.contiguous(memory_format=torch.channels_last), bias


def run_case(name, rows, size, c_in, c_out, with_shift, device, timed: bool) -> str:
    norm, x, shift, weight, bias = case(rows, size, c_in, c_out, with_shift, device)
    with torch.no_grad():  # the kit's ops without fused_group_norms
        hidden = G.group_norm_reference(x, norm, shift, silu=True)
        reference = F.conv2d(hidden, weight, bias, padding=1)
        out_scale = (hidden.abs().amax().float() / FP8_MAX).reshape(1)
    w_q, w_scale = conv.quantize_out_channels(weight.permute(0, 2, 3, 1).contiguous())
    scale = out_scale * w_scale
    hidden_bf16, hidden_fp8 = torch.empty_like(x), torch.empty_like(x, dtype=FP8)

    def norms(out, given_scale=None):
        if timed:  # the tuned kernels
            G._launch(G._KERNELS, x, shift, norm.weight, norm.bias, norm.num_groups, norm.eps, True, out,
                      out_scale=given_scale)
        else:
            G.run_group_norm_config(x, norm, shift, True, out, FIXED["stat"], FIXED["normalize"], given_scale)
        return out

    def fp8_conv():
        return conv.conv_nhwc(hidden_fp8.permute(0, 2, 3, 1), w_q, scale, bias, 1, 1, None if timed else FIXED["conv"])

    with torch.no_grad():
        bf16_out = F.conv2d(norms(hidden_bf16), weight, bias, padding=1)
        norms(hidden_fp8, out_scale)
        fp8_out = fp8_conv().permute(0, 3, 1, 2)
        hidden_fp8.copy_((hidden / out_scale).to(FP8))  # the same values rounded to e4m3 by torch
        torch_rounded_out = fp8_conv().permute(0, 3, 1, 2)
    row = (f"| {name} | {relative_error(bf16_out, reference):.4f} | {relative_error(fp8_out, reference):.4f} | "
           f"{relative_error(torch_rounded_out, reference):.4f} |")
    if not timed:
        return row
    compiled_norm = torch.compile(G.group_norm_reference, fullgraph=True)
    with torch.no_grad():
        times = {"kit norm": gpu_ms(lambda: compiled_norm(x, norm, shift, True)),
                 "cudnn": gpu_ms(lambda: F.conv2d(hidden_bf16, weight, bias, padding=1)),
                 "bf16 norms": gpu_ms(lambda: norms(hidden_bf16)),
                 "fp8 norms": gpu_ms(lambda: norms(hidden_fp8, out_scale)),
                 "fp8 conv": gpu_ms(fp8_conv)}
    kit = times["kit norm"] + times["cudnn"]
    fp8 = times["fp8 norms"] + times["fp8 conv"]
    torch._dynamo.reset()
    return (row + f" {times['kit norm']:.3f} + {times['cudnn']:.3f} = {kit:.3f} | "
            f"{times['bf16 norms']:.3f} + {times['cudnn']:.3f} | {times['fp8 norms']:.3f} + {times['fp8 conv']:.3f} "
            f"= {fp8:.3f} | {kit / fp8:.2f}x |")


def main() -> None:
    run_experiment(run_case, TINY, SHAPES, "bf16 norms + cuDNN rel. error | fp8 norms + fp8 conv rel. error | "
                   "the same, the norm's output rounded to e4m3 by torch",
                   "kit: inductor norm + cuDNN ms | bf16 norms + cuDNN ms | fp8 norms + fp8 conv ms | kit / fp8")


if __name__ == "__main__":
    main()
