"""Does an fp8 3x3 convolution run at GEMM speed on Hopper if its input is stored zero-framed? (sccsdxl.fp8_conv)

The UNet's convolutions are 4.8-4.9 s of a 21.4-21.8 s batch of 50 on an H200 (BENCHMARKS.md, sessions 16-17), in
bf16 through cuDNN, while its fp8 GEMMs run near 1,300 TFLOP/s. Neither cuDNN's fp8 convolution (310 TFLOP/s at most
shapes, session 9) nor conv_fp8_h200.py's implicit GEMM (770-900 TFLOP/s: each program gathers its 3x3 window
through pointers, session 5) came close. Option fp8_convs stores the input as the GroupNorm kernel writes it: e4m3
with one scale, NHWC, each image framed by a one-pixel border of zeros, flattened to rows of pixels. Then the pixel
under tap (dy, dx) of output pixel q is input row q + dy * (W + 2) + dx, for every q of the framed grid: each tap's
operand is the same matrix shifted by a constant number of rows, every tile load one 2D TMA block, and the kernel
is a GEMM over K = 9 x C_in. It computes the frame's outputs too (13 % more at 32 x 32, 6 % at 64 x 64, 3 % at
128 x 128) and stores only the image's. Session 18 measured this TMA form at 1,130-1,190 TFLOP/s where the same
kernel with plain pointer loads (the package at 6bbaf5e) ran 630-930; the package now has the TMA form.

At the UNet's 3x3 convolutions (50 rows: batch 25 with guidance), it checks sccsdxl.fp8_conv's kernel against the
convolution of the dequantized e4m3 input and weights (exact up to the bf16 output) and against cuDNN's bf16
convolution of the same input (the fp8 error), then times cuDNN in bf16, conv_fp8_h200.py's kernel in fp8,
sccsdxl.fp8_conv's, and framing + quantizing the input with torch (compiled). TFLOP/s count the image's outputs
only. Then a ResNet block's GroupNorm + SiLU and convolution as fused_group_norms runs them (the norm kernels
writing bf16, then cuDNN) against fp8_convs (group_norm_framed_fp8: the frame zeroed, the statistics with the largest
value, the e4m3 write; then sccsdxl.fp8_conv). Run on a Hopper GPU node:
  python3 benchmarks/conv_shifted_fp8_h200.py            # or --interpret on a CPU: tiny shapes, correctness only
  python3 benchmarks/conv_shifted_fp8_h200.py --tiles    # every tuning choice at each shape, with its operand traffic
  python3 benchmarks/conv_shifted_fp8_h200.py --tiles --residual   # the same with a ResNet block's residual add in
                                                         # the epilogue, SCCSDXL_CONV_SPLIT_EPILOGUES=1's tiles too
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import conv_fp8_h200 as gathered  # switches Triton's interpreter on first under --interpret
from kernel_bench import FP8, FP8_MAX, gpu_ms, relative_error, run_experiment

sys.path.insert(0, ".")
from sccsdxl import fp8_conv  # noqa: E402
from sccsdxl import group_norm as G  # noqa: E402

# the 3x3, stride-1 convolutions of conv_fp8_h200.py (the downsampler and the 1x1 shortcut are GEMM-like already)
SHAPES = [shape for shape in gathered.SHAPES if shape[5] == 3 and shape[6] == 1]
TINY = [("tiny 3x3, 6 x 6", 2, 6, 64, 32), ("tiny 3x3, 3 images of 5 x 5, partial tiles", 3, 5, 96, 40)]
FIXED = {"BM": 16, "BN": 16, "BK": 32, "GROUP_M": 2}  # the interpreter cannot autotune


def framed_fp8(x_nhwc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(N, H, W, C) -> e4m3 rows of the zero-framed grid, as sccsdxl.group_norm lays them out (frame_rows)."""
    n, h, w, c = x_nhwc.shape
    framed = torch.zeros(G.frame_rows(n, h, w), c, device=x_nhwc.device, dtype=torch.float32)
    G.framed_interior(framed, n, h, w).copy_((x_nhwc.float() / scale).clamp(-FP8_MAX, FP8_MAX))
    return framed.to(FP8)


def kit_conv(framed: torch.Tensor, w_k: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
             bias: torch.Tensor | None, n: int, h: int, w: int, config: dict | None = None,
             residual: torch.Tensor | None = None) -> torch.Tensor:
    """sccsdxl.fp8_conv's kernel on ``framed`` (from framed_fp8) and ``w_k`` ((C_out, 9 C_in), taps before
    channels), the input scale given as its largest value; ``config``: fixed tiles instead of tuning; ``residual``
    ((N, H, W, C_out)): added in the epilogue, the sum halved. Returns (N, H, W, C_out) bf16."""
    y = torch.empty(n, h, w, w_k.shape[0], device=framed.device, dtype=torch.bfloat16)
    kernel = fp8_conv._shifted_conv_kernel
    fp8_conv._launch(kernel if config is None else kernel.fn, framed, x_scale * FP8_MAX, w_k, w_scale, bias, y, h,
                     w, residual=residual, residual_scale=0.5, **(config or {}))
    return y


def case(rows, size, c_in, c_out, device):
    """Input like GroupNorm + SiLU's output, weights at kaiming scale, the bias small."""
    x = F.silu(torch.randn(rows, c_in, size, size, device=device) * 1.5).to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(c_out, c_in, 3, 3, device=device) * (2 / (c_in * 9)) ** 0.5).to(torch.bfloat16)
    bias = (torch.randn(c_out, device=device) * 0.1).to(torch.bfloat16)
    return x, weight.contiguous(memory_format=torch.channels_last), bias


def run_case(name, rows, size, c_in, c_out, *_, device, timed: bool) -> str:
    x, weight, bias = case(rows, size, c_in, c_out, device)
    x_nhwc = x.permute(0, 2, 3, 1)  # a view: channels_last memory is NHWC-contiguous
    x_scale = (x.abs().amax().float() / FP8_MAX).reshape(1)  # as the norm's largest value sets it
    w_q, w_scale = gathered.quantize_out_channels(weight.permute(0, 2, 3, 1).contiguous())
    framed, w_k = framed_fp8(x_nhwc, x_scale), w_q.reshape(c_out, -1).contiguous()
    out = kit_conv(framed, w_k, x_scale, w_scale, bias, rows, size, size, None if timed else FIXED)
    out = out.permute(0, 3, 1, 2)
    reference = F.conv2d(x, weight, bias, padding=1)
    x_q = (x.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    dequantized = F.conv2d(x_q.float() * x_scale, w_q.float().permute(0, 3, 1, 2) * w_scale[:, None, None, None],
                           bias.float(), padding=1)
    row = f"| {name} | {relative_error(out, dequantized):.4f} | {relative_error(out, reference):.4f} |"
    if not timed:
        return row
    flop = 2 * rows * size * size * c_out * c_in * 9
    x_q_nhwc = x_q.permute(0, 2, 3, 1)
    frame = torch.compile(framed_fp8, dynamic=False)
    frame(x_nhwc, x_scale)
    times = {"cudnn": gpu_ms(lambda: F.conv2d(x, weight, bias, padding=1)),
             "gathered": gpu_ms(lambda: gathered.conv_nhwc(x_q_nhwc, w_q, x_scale * w_scale, bias, 1, 1)),
             "kit": gpu_ms(lambda: kit_conv(framed, w_k, x_scale, w_scale, bias, rows, size, size)),
             "frame": gpu_ms(lambda: frame(x_nhwc, x_scale))}
    rate = {key: f"{ms:.3f} ({flop / ms / 1e9:.0f})" for key, ms in times.items() if key != "frame"}
    best = fp8_conv._shifted_conv_kernel.best_config
    times.update(block_times(x))
    today = times["norm bf16"] + times["cudnn"]
    fp8 = times["norm framed"] + times["kit"]
    return (row + f" {rate['cudnn']} | {rate['gathered']} | {rate['kit']} | {best.kwargs} w{best.num_warps} "
            f"s{best.num_stages} | {times['frame']:.3f} | {times['cudnn'] / times['kit']:.2f}x | "
            f"{times['norm bf16']:.3f} + {times['cudnn']:.3f} = {today:.3f} | {times['norm framed']:.3f} + "
            f"{times['kit']:.3f} = {fp8:.3f} | {today / fp8:.2f}x |")


def block_times(x: torch.Tensor) -> dict[str, float]:
    """ms of a ResNet block's GroupNorm + SiLU as fused_group_norms runs it (bf16) and as fp8_convs does (e4m3 into
    framed rows, their frame zeroed, the largest value from the statistics); ``x`` stands in for the norm's input."""
    norm = torch.nn.GroupNorm(32, x.shape[1]).to(x.device, torch.bfloat16)
    with torch.no_grad():
        return {"norm bf16": gpu_ms(lambda: G.group_norm(x, norm, silu=True)),
                "norm framed": gpu_ms(lambda: G.group_norm_framed_fp8(x, norm))}


def tile_rows(name, rows, size, c_in, c_out, *_, residual: bool = False) -> list[str]:
    """Every tuning choice of sccsdxl.fp8_conv at one shape, the larger and persistent tiles too: ms, TFLOP/s, and the
    operand tiles its programs load (each program loads a BM x BK and a BN x BK e4m3 tile per step, 9 C_in / BK steps;
    the grid covers the framed rows and whole channel tiles), in GB and per second: if that rate is the same for every
    tile, the kernel is bound by moving operands from L2, and larger tiles are what speeds it up. ``residual``: with
    a residual add in the epilogue, the tiles above 128 x 128 outputs storing it in halves."""
    x, weight, bias = case(rows, size, c_in, c_out, "cuda")
    x_scale = (x.abs().amax().float() / FP8_MAX).reshape(1)
    w_q, w_scale = gathered.quantize_out_channels(weight.permute(0, 2, 3, 1).contiguous())
    framed, w_k = framed_fp8(x.permute(0, 2, 3, 1), x_scale), w_q.reshape(c_out, -1).contiguous()
    flop = 2 * rows * size * size * c_out * c_in * 9
    shortcut = torch.randn(rows, size, size, c_out, device="cuda", dtype=torch.bfloat16) if residual else None
    out = []
    args = {"C_IN": c_in, "C_OUT": c_out, "HAS_RESIDUAL": residual}
    for config in fp8_conv.fits(fp8_conv.configs(more=True), args, split_epilogues=True):
        kw = config.kwargs
        launch = {**kw, "num_warps": config.num_warps, "num_stages": config.num_stages}
        ms = gpu_ms(lambda: kit_conv(framed, w_k, x_scale, w_scale, bias, rows, size, size, launch, shortcut))
        tiles = -(-framed.shape[0] // kw["BM"]) * -(-c_out // kw["BN"])
        moved = tiles * (9 * c_in // kw["BK"]) * (kw["BM"] + kw["BN"]) * kw["BK"] / 1e9
        form = ", persistent" if kw["PERSISTENT"] else ""
        out.append(f"| {name}{', residual' if residual else ''} | {kw['BM']} x {kw['BN']} x {kw['BK']}, "
                   f"{config.num_warps} warps, {config.num_stages} stages{form} | {ms:.3f} | {flop / ms / 1e9:.0f} | "
                   f"{moved:.1f} | {moved / ms:.2f} |")
    return out


def main() -> None:
    if "--tiles" in sys.argv:  # every tuning choice at each shape (GPU only)
        torch.manual_seed(0)
        print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}\n")
        print("| shape | tile | ms | TFLOP/s | operand tiles loaded, GB | TB/s |\n|---|---|---|---|---|---|")
        for shape in SHAPES:
            print("\n".join(tile_rows(*shape, residual="--residual" in sys.argv)), flush=True)
        return
    run_experiment(run_case, TINY, SHAPES, "rel. error vs the dequantized convolution | vs cuDNN bf16",
                   "cuDNN bf16 ms (TFLOP/s) | conv_fp8_h200's gathered fp8 ms (TFLOP/s) | sccsdxl.fp8_conv ms "
                   "(TFLOP/s) | its tile | framing + quantizing the input ms (torch, compiled) | cuDNN / fp8_conv | "
                   "fused_group_norms: norm (bf16) + cuDNN ms | fp8_convs: framed e4m3 norm + sccsdxl.fp8_conv ms "
                   "| fused_group_norms / fp8_convs |")


if __name__ == "__main__":
    main()
