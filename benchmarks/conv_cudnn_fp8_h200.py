"""Experiment: does cuDNN's own fp8 convolution (through cudnn-frontend's graph API) beat its bf16 one at the UNet's
convolution shapes?

``conv_fp8_h200.py`` showed that a plain Triton fp8 implicit-GEMM convolution reaches 670-900 TFLOP/s against
cuDNN's 520-770 in bf16, too little to pay for quantizing the activation (BENCHMARKS.md, session 5). cuDNN builds
fp8 convolutions on Hopper through its graph API, which PyTorch 2.11's conv2d does not reach; cudnn-frontend's
Python package does (``pip install nvidia-cudnn-frontend==1.14.1``). Here the graph is the convolution of an
e4m3 activation (one scale for the tensor) and an e4m3 weight (one scale per output channel), then the product
of the two scales per output channel and the bias, written in bf16, NHWC in and out. Timed for batch 25 with
guidance (50 rows) at the shapes of ``conv_fp8_h200.py``: cuDNN bf16 (F.conv2d), cuDNN fp8, and the
activation's quantization (compiled) that a dynamic scale adds; with the fp8 output's error against bf16's.
A static (calibrated) scale would let the GroupNorm + SiLU before each convolution write e4m3 itself, so the
"fp8 alone" column is the ceiling. Run on a Hopper GPU node:
  python3 benchmarks/conv_cudnn_fp8_h200.py
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from conv_fp8_h200 import SHAPES, case, quantize_out_channels  # any weight with output channels first
from kernel_bench import build_cudnn_graph, cudnn_fp8_graph, gpu_ms, print_cudnn_table, quantize_tensor, relative_error


class Fp8Conv:
    """One cuDNN graph for one shape: e4m3 conv, times a per-channel descale, plus bias, out in bf16."""

    def __init__(self, x_q: torch.Tensor, w_q: torch.Tensor, out: torch.Tensor, stride: int, pad: int):
        self.cudnn, self.handle, graph = cudnn_fp8_graph()
        cudnn = self.cudnn
        e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        self.x = graph.tensor(name="x", dim=list(x_q.shape), stride=list(x_q.stride()), data_type=e4m3)
        self.w = graph.tensor(name="w", dim=list(w_q.shape), stride=list(w_q.stride()), data_type=e4m3)
        channels = w_q.shape[0]
        per_channel = dict(dim=[1, channels, 1, 1], stride=[channels, 1, channels, channels], data_type=fp32)
        self.descale, self.bias = graph.tensor(name="descale", **per_channel), graph.tensor(name="bias", **per_channel)
        conv = graph.conv_fprop(image=self.x, weight=self.w, pre_padding=[pad, pad], post_padding=[pad, pad],
                                stride=[stride, stride], dilation=[1, 1], compute_data_type=fp32, name="conv")
        self.y = graph.bias(input=graph.mul(a=conv, b=self.descale, name="apply_descale"), bias=self.bias,
                            name="add_bias")
        self.y.set_output(True).set_dim(list(out.shape)).set_stride(list(out.stride()))
        self.y.set_data_type(cudnn.data_type.BFLOAT16)
        self.graph, self.workspace = graph, build_cudnn_graph(cudnn, graph)

    def __call__(self, x_q, w_q, descale, bias, out) -> torch.Tensor:
        self.cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream().cuda_stream)
        pack = {self.x: x_q, self.w: w_q, self.descale: descale, self.bias: bias, self.y: out}
        self.graph.execute(pack, self.workspace, handle=self.handle)
        return out


def run_case(name, rows, size, c_in, c_out, k, stride) -> str:
    pad = k // 2
    x, weight, bias = case(rows, size, c_in, c_out, k, stride, "cuda")
    reference = F.conv2d(x, weight, bias, stride=stride, padding=pad)
    quantize = torch.compile(quantize_tensor, dynamic=True)
    x_q, x_scale = quantize(x)  # elementwise: keeps x's channels-last (NHWC) memory
    w_q, w_scale = quantize_out_channels(weight)  # keeps the weight's channels-last memory
    descale = (x_scale * w_scale).view(1, c_out, 1, 1).contiguous()
    bias32 = bias.float().view(1, c_out, 1, 1).contiguous()
    out = torch.empty_like(reference)
    try:
        conv = Fp8Conv(x_q, w_q, out, stride, pad)
    except Exception as exc:  # cuDNN says which part of the graph it cannot run
        return f"| {name} | cuDNN cannot build it: {type(exc).__name__}: {str(exc).splitlines()[0][:300]} |"
    error = relative_error(conv(x_q, w_q, descale, bias32, out), reference)
    times = {"bf16": gpu_ms(lambda: F.conv2d(x, weight, bias, stride=stride, padding=pad)),
             "fp8": gpu_ms(lambda: conv(x_q, w_q, descale, bias32, out)), "quant": gpu_ms(lambda: quantize(x))}
    flop = 2 * rows * reference.shape[2] * reference.shape[3] * c_out * c_in * k * k
    tflops = {key: flop / times[key] / 1e9 for key in ("bf16", "fp8")}
    return (f"| {name} | {error:.4f} | {times['bf16']:.3f} ({tflops['bf16']:.0f}) | {times['fp8']:.3f} "
            f"({tflops['fp8']:.0f}) | {times['quant']:.3f} | {times['bf16'] / times['fp8']:.2f}x | "
            f"{times['bf16'] / (times['fp8'] + times['quant']):.2f}x |")


def main() -> None:
    torch.manual_seed(0)
    print_cudnn_table("| shape | fp8 rel. error vs bf16 | cuDNN bf16 ms (TFLOP/s) | cuDNN fp8 ms (TFLOP/s) | "
                      "activation quantization ms | bf16 / fp8 alone | bf16 / (fp8 + quantization) |",
                      (run_case(*shape) for shape in SHAPES))


if __name__ == "__main__":
    main()
