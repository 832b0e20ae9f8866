"""BENCHMARKS.md "fp8 convolutions, measured alone": would an fp8 implicit-GEMM convolution beat cuDNN's bf16 one?

The UNet's convolutions take about 130 ms of a 588 ms forward on an H200 (bf16, cuDNN, about 620 TFLOP/s),
and PyTorch 2.11 has no fp8 convolution for Hopper (torchao's fp8 conv2d calls a Blackwell-only kernel). This
experiment writes one in Triton: the activation quantized to fp8 with one per-tensor scale, the weight with one
scale per output channel, NHWC in and out, the 3x3 (or 1x1) window gathered inside the kernel (implicit GEMM,
no im2col buffer). It times, at the UNet's convolution shapes for batch 25 with guidance (50 rows): cuDNN bf16,
the same Triton kernel in bf16 (is Triton's gather competitive at all?), the Triton kernel in fp8, and the
activation's quantization (amax + cast, compiled) that fp8 adds; and the fp8 output's error against bf16's.
Run on a GPU node:
  python3 benchmarks/conv_fp8_h200.py            # or --interpret on a CPU: tiny shapes, correctness only
"""
from __future__ import annotations

import os
import sys

if "--interpret" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from kernel_bench import FP8, FP8_MAX, gpu_ms, quantize_tensor, relative_error, run_experiment  # noqa: E402

sys.path.insert(0, ".")
from sccsdxl.ffn_gemm import grouped_tile  # noqa: E402  the tile order of sccsdxl's GEMM kernel


# (name, rows, size, in channels, out channels, kernel, stride): the UNet's 3x3 convolutions at 50 rows
SHAPES = [
    ("1280 level, 3x3 1280->1280", 50, 32, 1280, 1280, 3, 1),
    ("1280 level up, 3x3 2560->1280", 50, 32, 2560, 1280, 3, 1),
    ("640 level, 3x3 640->640", 50, 64, 640, 640, 3, 1),
    ("640 level up, 3x3 1920->640", 50, 64, 1920, 640, 3, 1),
    ("640 level upsampler, 3x3 1280->1280", 50, 64, 1280, 1280, 3, 1),
    ("320 level, 3x3 320->320", 50, 128, 320, 320, 3, 1),
    ("320 level up, 3x3 960->320", 50, 128, 960, 320, 3, 1),
    ("320 level upsampler, 3x3 640->640", 50, 128, 640, 640, 3, 1),
    ("640 level downsampler, 3x3 s2 640->640", 50, 64, 640, 640, 3, 2),
    ("1280 level up shortcut, 1x1 2560->1280", 50, 32, 2560, 1280, 1, 1),
]
TINY = [("tiny 3x3", 2, 6, 64, 32, 3, 1), ("tiny 3x3 s2", 2, 7, 128, 64, 3, 2), ("tiny 1x1", 2, 5, 64, 48, 1, 1)]


def _configs() -> list:
    out = []
    for bm, bn, bk, warps, stages in [(128, 128, 128, 8, 3), (128, 256, 128, 8, 3), (128, 128, 64, 4, 4),
                                      (128, 64, 128, 4, 4), (128, 256, 64, 8, 4)]:
        out.append(triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=warps, num_stages=stages))
    return out


def _fits(configs, named_args, **kwargs):
    """Only block sizes that divide the input channels (each K step reads one tap's contiguous channel run)."""
    c_in = named_args["C_IN"]
    kept = [c for c in configs if c_in % c.kwargs["BK"] == 0]
    return kept or configs[:0]


@triton.autotune(configs=_configs(), key=["M", "C_IN", "C_OUT", "KH", "STRIDE"],
                 prune_configs_by={"early_config_prune": _fits})
@triton.jit
def _conv_kernel(x_ptr, w_ptr, y_ptr, scale_ptr, bias_ptr, M, H, W, OH, OW, C_IN, C_OUT,
                 KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
                 HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 GROUP_M: tl.constexpr):
    """y[m, n] = scale[n] * sum over taps and channels of x[pixel(m, tap), c] * w[n, tap, c] (+ bias[n])."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(C_OUT, BN)
    pid_m, pid_n = grouped_tile(pid, num_m, num_n, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    image = rm // (OH * OW)
    rest = rm % (OH * OW)
    oh = rest // OW
    ow = rest % OW
    m_ok = rm < M
    n_ok = rn < C_OUT
    w_rows = w_ptr + rn.to(tl.int64)[None, :] * (KH * KW * C_IN) + rk[:, None]
    chunks = C_IN // BK
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, KH * KW * chunks):
        tap = k // chunks
        c0 = (k % chunks) * BK
        ih = oh * STRIDE + tap // KW - PAD
        iw = ow * STRIDE + tap % KW - PAD
        ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        pixel = ((image * H + ih) * W + iw).to(tl.int64)
        a = tl.load(x_ptr + pixel[:, None] * C_IN + c0 + rk[None, :], mask=ok[:, None], other=0.0)
        b = tl.load(w_rows + tap * C_IN + c0, mask=n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc)
    out = acc * tl.load(scale_ptr + rn, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm.to(tl.int64)[:, None] * C_OUT + rn[None, :], out.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def conv_nhwc(x: torch.Tensor, w_taps: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
              stride: int, pad: int, config: dict | None = None) -> torch.Tensor:
    """x: (N, H, W, C_in) contiguous; w_taps: (C_out, KH, KW, C_in) contiguous; scale: (C_out,) fp32.
    config: fixed block sizes instead of autotuning (Triton's CPU interpreter cannot autotune)."""
    n, h, w, c_in = x.shape
    c_out, kh, kw, _ = w_taps.shape
    oh, ow = (h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kw) // stride + 1
    y = torch.empty(n, oh, ow, c_out, device=x.device, dtype=torch.bfloat16)
    m = n * oh * ow
    grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(c_out, meta["BN"]),)  # noqa: E731
    kernel = _conv_kernel if config is None else _conv_kernel.fn
    kernel[grid](x, w_taps, y, scale, bias if bias is not None else scale, m, h, w, oh, ow, c_in, c_out,
                 KH=kh, KW=kw, STRIDE=stride, PAD=pad, HAS_BIAS=bias is not None, **(config or {}))
    return y


def quantize_out_channels(w_taps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale per output channel of a (C_out, KH, KW, C_in) weight."""
    scale = (w_taps.abs().amax(dim=(1, 2, 3)).float() / FP8_MAX).clamp(min=1e-12)
    return (w_taps.float() / scale[:, None, None, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def case(rows, size, c_in, c_out, k, stride, device):
    """Input after GroupNorm + SiLU-like values, weights at kaiming scale, the bias small."""
    x = F.silu(torch.randn(rows, c_in, size, size, device=device)).to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(c_out, c_in, k, k, device=device) * (2 / (c_in * k * k)) ** 0.5).to(torch.bfloat16)
    bias = (torch.randn(c_out, device=device) * 0.1).to(torch.bfloat16)
    return x, weight.contiguous(memory_format=torch.channels_last), bias


def run_case(name, rows, size, c_in, c_out, k, stride, device, timed: bool) -> str:
    pad = k // 2
    x, weight, bias = case(rows, size, c_in, c_out, k, stride, device)
    reference = F.conv2d(x, weight, bias, stride=stride, padding=pad)
    x_nhwc = x.permute(0, 2, 3, 1)  # a view: channels_last memory is NHWC-contiguous
    w_taps = weight.permute(0, 2, 3, 1).contiguous()
    ones = torch.ones(c_out, device=device)
    fixed = None if timed else {"BM": 16, "BN": 16, "BK": 32, "GROUP_M": 2}
    # Triton's CPU interpreter cannot multiply bf16 blocks: there the unquantized path runs in fp32
    high = (x_nhwc, w_taps, bias) if timed else (x_nhwc.float(), w_taps.float(), bias.float())
    bf16_out = conv_nhwc(high[0], high[1], ones, high[2], stride, pad, fixed).permute(0, 3, 1, 2)
    x_q, x_scale = quantize_tensor(x_nhwc)
    w_q, w_scale = quantize_out_channels(w_taps)
    scale = x_scale * w_scale
    fp8_out = conv_nhwc(x_q, w_q, scale, bias, stride, pad, fixed).permute(0, 3, 1, 2)
    row = f"| {name} | {relative_error(bf16_out, reference):.4f} | {relative_error(fp8_out, reference):.4f} |"
    if not timed:
        return row
    flop = 2 * rows * reference.shape[2] * reference.shape[3] * c_out * c_in * k * k
    quantize = torch.compile(quantize_tensor, dynamic=True)
    quantize(x_nhwc)
    times = {"cudnn": gpu_ms(lambda: F.conv2d(x, weight, bias, stride=stride, padding=pad)),
             "bf16": gpu_ms(lambda: conv_nhwc(x_nhwc, w_taps, ones, bias, stride, pad)),
             "fp8": gpu_ms(lambda: conv_nhwc(x_q, w_q, scale, bias, stride, pad)),
             "quant": gpu_ms(lambda: quantize(x_nhwc))}
    tflops = {key: flop / ms / 1e9 for key, ms in times.items() if key != "quant"}
    speedup = times["cudnn"] / (times["fp8"] + times["quant"])
    return (row + f" {times['cudnn']:.3f} ({tflops['cudnn']:.0f}) | {times['bf16']:.3f} ({tflops['bf16']:.0f}) | "
            f"{times['fp8']:.3f} ({tflops['fp8']:.0f}) | {times['quant']:.3f} | {speedup:.2f}x | "
            f"{_conv_kernel.best_config.kwargs} w{_conv_kernel.best_config.num_warps} "
            f"s{_conv_kernel.best_config.num_stages} |")


def main() -> None:
    high = "fp32" if "--interpret" in sys.argv else "bf16"
    run_experiment(run_case, TINY, SHAPES, f"Triton {high} rel. error vs cuDNN | fp8 rel. error vs bf16 cuDNN",
                   "cuDNN bf16 ms (TFLOP/s) | Triton bf16 ms (TFLOP/s) | Triton fp8 ms (TFLOP/s) | "
                   "fp8 quantization ms | cuDNN / (fp8 + quantization) | chosen config")


if __name__ == "__main__":
    main()
