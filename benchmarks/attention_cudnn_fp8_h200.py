"""Experiment: does cuDNN's own fp8 attention (cudnn-frontend's ``sdpa_fp8``) beat its bf16 attention at the
UNet's self-attention shapes, quantization included?

``attention_fp8_h200.py`` showed that a Triton flash-attention in fp8 is no faster than cuDNN in bf16 on an H200.
cuDNN has an fp8 forward of its own, which PyTorch 2.11's scaled_dot_product_attention does not reach; the
cudnn-frontend Python package builds it (``pip install nvidia-cudnn-frontend==1.14.1``; later versions pull in
CUTLASS's DSL). On Hopper it takes e4m3 Q, K, V with one descale each and writes an e4m3 output. Here Q, K and
V stay interleaved as the fused q/k/v projection writes them (no copies): that output is quantized in place with
one scale per third, cuDNN reads the three strided views, and its e4m3 output (scaled by 1/descale_v: an
average of V's rows cannot exceed V's largest value) is turned back into bf16 for the output projection. Timed
for batch 25 with guidance (50 rows): cuDNN bf16 through scaled_dot_product_attention on the same views, cuDNN
fp8 alone, and the quantization before plus the dequantization after (compiled, as inductor would fuse them
into the neighbouring kernels at best), with the fp8 output's error against bf16's. Run on a Hopper GPU node:
  python3 benchmarks/attention_cudnn_fp8_h200.py
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernel_bench import (FP8, FP8_MAX, SELF_ATTENTION_SHAPES, build_cudnn_graph, cudnn_fp8_graph, gpu_ms,
                          print_cudnn_table, relative_error, split_heads)

def quantize_thirds(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 q/k/v in the projection's layout, with one descale for each of the three."""
    batch, tokens, width3 = qkv.shape
    thirds = qkv.view(batch, tokens, 3, width3 // 3)
    descale = (thirds.abs().amax(dim=(0, 1, 3)).float() / FP8_MAX).clamp(min=1e-12)
    return (thirds.float() / descale.view(1, 1, 3, 1)).to(FP8).view(batch, tokens, width3), descale


def dequantize_output(o: torch.Tensor, descale_v: torch.Tensor) -> torch.Tensor:
    """cuDNN's e4m3 output, written as O / descale_v, back to bf16 values."""
    return (o.float() * descale_v).to(torch.bfloat16)


class Fp8Attention:
    """One cuDNN fp8 attention graph for one shape; ``__call__`` runs it on an e4m3 fused q/k/v tensor."""

    def __init__(self, batch: int, tokens: int, heads: int, d: int):
        self.cudnn, self.handle, graph = cudnn_fp8_graph()
        cudnn = self.cudnn
        e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        dims = [batch, heads, tokens, d]
        qkv_strides = [tokens * 3 * heads * d, d, 3 * heads * d, 1]
        self.out_strides = [tokens * heads * d, d, heads * d, 1]  # (batch, tokens, heads*d) for the projection
        self.q, self.k, self.v = (graph.tensor(name=n, dim=dims, stride=qkv_strides, data_type=e4m3) for n in "qkv")
        scalar = dict(dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=fp32)
        self.scalars = [graph.tensor(name=n, **scalar) for n in ("dq", "dk", "dv", "ds", "ss", "so")]
        o, _, amax_s, amax_o = graph.sdpa_fp8(self.q, self.k, self.v, *self.scalars, is_inference=True,
                                              attn_scale=1.0 / math.sqrt(d), use_causal_mask=False, name="attn")
        o.set_output(True).set_dim(dims).set_stride(self.out_strides).set_data_type(e4m3)
        for amax in (amax_s, amax_o):
            amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(fp32)
        self.workspace = build_cudnn_graph(cudnn, graph)
        self.graph, self.o, self.amax = graph, o, (amax_s, amax_o)
        self.shape, self.heads = (batch, tokens, heads * d), heads
        self.amax_buffers = [torch.empty(1, 1, 1, 1, device="cuda") for _ in range(2)]
        self.s_scales = [torch.full((1, 1, 1, 1), 1 / FP8_MAX, device="cuda"),  # probabilities use e4m3's range
                         torch.full((1, 1, 1, 1), FP8_MAX, device="cuda")]

    def __call__(self, qkv_fp8: torch.Tensor, descale: torch.Tensor) -> torch.Tensor:
        q, k, v = split_heads(qkv_fp8, self.heads)
        out = torch.empty(self.shape, device="cuda", dtype=FP8)
        dq, dk, dv = (descale[i].view(1, 1, 1, 1) for i in range(3))
        values = [dq, dk, dv, *self.s_scales, (1 / dv)]
        pack = {self.q: q, self.k: k, self.v: v, self.o: out, self.amax[0]: self.amax_buffers[0],
                self.amax[1]: self.amax_buffers[1], **dict(zip(self.scalars, values))}
        self.cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream().cuda_stream)
        self.graph.execute(pack, self.workspace, handle=self.handle)
        return out


def run_case(name, rows, tokens, heads, d) -> str:
    qkv = torch.randn(rows, tokens, 3 * heads * d, device="cuda", dtype=torch.bfloat16)
    q, k, v = split_heads(qkv, heads)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        reference = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(rows, tokens, heads * d)
        bf16_ms = gpu_ms(lambda: F.scaled_dot_product_attention(q, k, v))
    quantize, dequantize = torch.compile(quantize_thirds), torch.compile(dequantize_output)
    qkv_fp8, descale = quantize(qkv)
    try:
        attention = Fp8Attention(rows, tokens, heads, d)
    except Exception as exc:  # cuDNN says which part of the graph it cannot run
        return f"| {name} | cuDNN cannot build it: {type(exc).__name__}: {str(exc).splitlines()[0][:300]} |"
    out = dequantize(attention(qkv_fp8, descale), descale[2])
    fp8_ms = gpu_ms(lambda: attention(qkv_fp8, descale))
    raw = attention(qkv_fp8, descale)
    around_ms = gpu_ms(lambda: quantize(qkv)) + gpu_ms(lambda: dequantize(raw, descale[2]))
    flop = 4 * rows * heads * tokens * tokens * d
    tflops = lambda ms: f"{ms:.3f} ({flop / ms / 1e9:.0f})"  # noqa: E731
    return (f"| {name} | {relative_error(out, reference):.4f} | {tflops(bf16_ms)} | {tflops(fp8_ms)} | "
            f"{around_ms:.3f} | {bf16_ms / (fp8_ms + around_ms):.2f}x |")


def main() -> None:
    torch.manual_seed(0)
    print_cudnn_table("| shape | fp8 rel. error | cuDNN bf16 ms (TFLOP/s) | cuDNN fp8 ms (TFLOP/s) | quantize + "
                      "dequantize ms | bf16 / (fp8 + around) |", (run_case(*shape) for shape in SELF_ATTENTION_SHAPES))


if __name__ == "__main__":
    main()
