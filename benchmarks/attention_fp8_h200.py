"""Experiment: would fp8 self-attention beat cuDNN's bf16 attention at the UNet's shapes?

Attention is about 103 ms of a 588 ms UNet forward on an H200 (cuDNN, bf16, all of it at head size 64), the
largest share still in bf16 after the GEMMs, and PyTorch 2.11's scaled_dot_product_attention takes no fp8.
This writes a flash-attention forward in Triton whose two matmuls run in e4m3: Q, K and V quantized with one
scale each (per tensor, as FlashAttention-3's fp8 path does), the softmax probabilities cast to e4m3 after
scaling them by 448 (so they use the format's whole range), V stored transposed so that both operands of the
second matmul are K-major as Hopper's fp8 tensor cores want (the untransposed layout is timed too). It times,
at the UNet's two self-attention shapes for batch 25 with guidance (50 rows): cuDNN bf16 through
scaled_dot_product_attention, the Triton kernel in bf16 and in fp8, and the quantization of the fused q/k/v
projection's output that fp8 adds (compiled), with the fp8 output's error against bf16's. Run on a GPU node:
  python3 benchmarks/attention_fp8_h200.py       # or --interpret on a CPU: tiny shapes, correctness only
"""
from __future__ import annotations

import math
import os
import sys

if "--interpret" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from kernel_bench import (FP8, FP8_MAX, SELF_ATTENTION_SHAPES, gpu_ms, quantize_tensor, relative_error,  # noqa: E402
                          run_experiment, split_heads)

LOG2E = 1.4426950408889634

TINY = [("tiny, 40 tokens", 2, 40, 2, 64), ("tiny, 130 tokens", 1, 130, 3, 64)]


def _configs() -> list:
    return [triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3),
                                 (128, 128, 4, 2)]]


@triton.autotune(configs=_configs(), key=["S_Q", "S_K", "V_T", "P_SCALE"])
@triton.jit
def _attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, qk_scale_ptr, out_scale_ptr, S_Q, S_K, D: tl.constexpr,
                      V_T: tl.constexpr, P_SCALE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """o = softmax(q k^T * scale) v for one (batch x head) and BM queries; q, k (BH, S, D); v (BH, S, D) or, V_T,
    (BH, D, S). qk_scale folds the q and k scales, 1/sqrt(D) and log2(e) (exp2 below); out_scale is v's scale
    over P_SCALE, the factor the probabilities were multiplied by before their cast to v's type."""
    bh = tl.program_id(1).to(tl.int64)
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rd = tl.arange(0, D)
    m_ok = rm < S_Q
    q = tl.load(q_ptr + bh * S_Q * D + rm[:, None] * D + rd[None, :], mask=m_ok[:, None], other=0.0)
    qk_scale = tl.load(qk_scale_ptr)
    row_max = tl.full((BM,), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((BM,), dtype=tl.float32)
    acc = tl.zeros((BM, D), dtype=tl.float32)
    k_base = k_ptr + bh * S_K * D
    v_base = v_ptr + bh * S_K * D
    for start in range(0, S_K, BN):
        rn = start + tl.arange(0, BN)
        n_ok = rn < S_K
        k_t = tl.load(k_base + rn[None, :] * D + rd[:, None], mask=n_ok[None, :], other=0.0)  # (D, BN), K-major
        scores = tl.dot(q, k_t) * qk_scale
        scores = tl.where(n_ok[None, :], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        p = tl.exp2(scores - new_max[:, None])
        correction = tl.exp2(row_max - new_max)
        row_sum = row_sum * correction + tl.sum(p, axis=1)
        if V_T:
            v = tl.load(v_base + rd[None, :] * S_K + rn[:, None], mask=n_ok[:, None], other=0.0)  # (BN, D), K-major
        else:
            v = tl.load(v_base + rn[:, None] * D + rd[None, :], mask=n_ok[:, None], other=0.0)
        acc = tl.dot((p * P_SCALE).to(v_ptr.dtype.element_ty), v, acc * correction[:, None])
        row_max = new_max
    out = acc / row_sum[:, None] * tl.load(out_scale_ptr)
    tl.store(o_ptr + bh * S_Q * D + rm[:, None] * D + rd[None, :], out.to(o_ptr.dtype.element_ty),
             mask=m_ok[:, None])


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qk_scale: torch.Tensor, out_scale: torch.Tensor,
              v_transposed: bool, config: dict | None = None) -> torch.Tensor:
    """q, k: (BH, S, D) contiguous; v: (BH, S, D), or (BH, D, S) when ``v_transposed``; returns (BH, S, D) bf16.
    config: fixed block sizes instead of autotuning (Triton's CPU interpreter cannot autotune)."""
    heads_rows, s_q, d = q.shape
    out = torch.empty(heads_rows, s_q, d, device=q.device, dtype=torch.bfloat16)
    grid = lambda meta: (triton.cdiv(s_q, meta["BM"]), heads_rows)  # noqa: E731
    kernel = _attention_kernel if config is None else _attention_kernel.fn
    kernel[grid](q, k, v, out, qk_scale, out_scale, s_q, k.shape[1], D=d, V_T=v_transposed,
                 P_SCALE=FP8_MAX if q.dtype == FP8 else 1.0, **(config or {}))
    return out


def quantize_qkv(qkv: torch.Tensor, heads: int):
    """e4m3 q, k (BH, S, D) and v transposed (BH, D, S), one scale per tensor; returns them and the two scales
    the kernel takes (q and k scales folded with 1/sqrt(D) and log2(e); v's over the probabilities' 448)."""
    (q, q_scale), (k, k_scale), (v, v_scale) = (quantize_tensor(t) for t in split_heads(qkv, heads))
    b, h, s, d = q.shape
    qk_scale = q_scale * k_scale * (LOG2E / math.sqrt(d))
    return (q.reshape(b * h, s, d).contiguous(), k.reshape(b * h, s, d).contiguous(),
            v.transpose(-1, -2).reshape(b * h, d, s).contiguous(), qk_scale.reshape(1),
            (v_scale / FP8_MAX).reshape(1))


def run_case(name, rows, tokens, heads, d, device, timed: bool) -> str:
    qkv = torch.randn(rows, tokens, 3 * heads * d, device=device).to(torch.bfloat16)
    qkv[..., : heads * d] *= 2.0  # queries larger than keys: a peakier softmax than unit-variance noise gives
    q, k, v = split_heads(qkv, heads)
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(torch.bfloat16)
    reference = reference.reshape(rows * heads, tokens, d)
    fixed = None if timed else {"BM": 16, "BN": 16}
    # the unquantized path in bf16 on a GPU; in fp32 under Triton's CPU interpreter, which cannot multiply bf16
    high = torch.bfloat16 if timed else torch.float32
    q_h, k_h, v_h = (t.to(high).reshape(rows * heads, tokens, d).contiguous() for t in (q, k, v))
    one = torch.ones(1, device=device)
    high_out = attention(q_h, k_h, v_h, one * (LOG2E / math.sqrt(d)), one, False, fixed)
    q8, k8, v8_t, qk_scale, out_scale = quantize_qkv(qkv, heads)
    fp8_out = attention(q8, k8, v8_t, qk_scale, out_scale, True, fixed)
    v8 = v8_t.transpose(-1, -2).contiguous()
    try:  # fp8 with the second operand N-major is what Hopper's tensor cores do not take: Triton may refuse it
        layouts = f"{relative_error(attention(q8, k8, v8, qk_scale, out_scale, False, fixed), fp8_out):.4f}"
    except Exception as exc:  # noqa: BLE001 - reported in the table, the other columns still measured
        v8, layouts = None, f"not built: {type(exc).__name__}"
    row = (f"| {name} | {relative_error(high_out, reference):.4f} | {relative_error(fp8_out, reference):.4f} | "
           f"{layouts} |")
    if not timed:
        return row
    flop = 4 * rows * heads * tokens * tokens * d
    quantize = torch.compile(quantize_qkv)
    quantize(qkv, heads)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        cudnn_ms = gpu_ms(lambda: F.scaled_dot_product_attention(q, k, v))
    times = {"cudnn": cudnn_ms,
             "bf16": gpu_ms(lambda: attention(q_h, k_h, v_h, one * (LOG2E / math.sqrt(d)), one, False)),
             "fp8": gpu_ms(lambda: attention(q8, k8, v8_t, qk_scale, out_scale, True)),
             "quant": gpu_ms(lambda: quantize(qkv, heads))}
    if v8 is not None:
        times["fp8 v untransposed"] = gpu_ms(lambda: attention(q8, k8, v8, qk_scale, out_scale, False))
    cells = " | ".join(f"{times[key]:.3f} ({flop / times[key] / 1e9:.0f})" if key in times else "-"
                       for key in ("cudnn", "bf16", "fp8", "fp8 v untransposed"))
    speedup = times["cudnn"] / (times["fp8"] + times["quant"])
    return row + f" {cells} | {times['quant']:.3f} | {speedup:.2f}x |"


def main() -> None:
    high = "fp32" if "--interpret" in sys.argv else "bf16"
    run_experiment(run_case, TINY, SELF_ATTENTION_SHAPES,
                   f"Triton {high} rel. error | fp8 rel. error | fp8, v untransposed vs transposed",
                   "cuDNN bf16 ms (TFLOP/s) | Triton bf16 ms (TFLOP/s) | Triton fp8 ms (TFLOP/s) | "
                   "Triton fp8, v untransposed ms (TFLOP/s) | "
                   "q/k/v quantization ms | cuDNN / (fp8 + quantization)")


if __name__ == "__main__":
    main()
