"""The fp8 kernel experiments in benchmarks/ (convolutions, attention, the persistent GEGLU GEMM), run by Triton's CPU interpreter on tiny shapes:
their kernels must compute what they claim before a GPU run times them."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter check is for CPU machines")
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def interpreted_rows(script: str) -> list[list[str]]:
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), "--interpret"], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("| tiny")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_fp8_convolution_matches_cudnns_definition():
    rows = interpreted_rows("conv_fp8_h200.py")
    assert len(rows) == 3  # 3x3, 3x3 with stride 2, 1x1
    for name, unquantized_error, fp8_error in rows:
        assert float(unquantized_error) < 0.01, name  # the gather, masks and bias: exact up to bf16 rounding
        assert float(fp8_error) < 0.06, name  # e4m3 activations and weights


def test_shifted_fp8_convolution_computes_the_convolution_of_its_e4m3_operands():
    rows = interpreted_rows("conv_shifted_fp8_h200.py")
    assert len(rows) == 2  # whole tiles, and partial row and channel tiles
    for name, exact_error, fp8_error in rows:
        assert float(exact_error) < 0.01, name  # shifted rows, the zero frame and guard, the stores: up to bf16 output
        assert float(fp8_error) < 0.06, name  # e4m3 activations (one scale) and weights (one per output channel)


def test_fp8_attention_matches_scaled_dot_product_attention():
    rows = interpreted_rows("attention_fp8_h200.py")
    assert len(rows) == 2  # one block of keys, and a length that leaves a partial block
    for name, unquantized_error, fp8_error, layouts_differ in rows:
        assert float(unquantized_error) < 0.01, name  # online softmax and masking
        assert float(fp8_error) < 0.1, name  # e4m3 q, k, v and probabilities
        assert float(layouts_differ) == 0, name  # v transposed or not: the same numbers


def test_cudnn_fp8_attentions_layout_and_scales():
    """attention_cudnn_fp8_h200.py hands cuDNN strided views of the quantized fused projection: the views must be
    the q, k, v that diffusers splits off, and the quantization must round-trip with one scale per third."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import attention_cudnn_fp8_h200 as experiment
        from kernel_bench import split_heads
    finally:
        sys.path.remove(str(BENCHMARKS))
    batch, tokens, heads, d = 2, 6, 3, 4
    qkv = torch.randn(batch, tokens, 3 * heads * d)
    qkv[..., heads * d:2 * heads * d] *= 10  # k ten times wider than q and v: its own scale
    for got, third in zip(split_heads(qkv, heads), qkv.chunk(3, dim=-1)):
        assert torch.equal(got, third.reshape(batch, tokens, heads, d).transpose(1, 2))
    fp8, descale = experiment.quantize_thirds(qkv)
    assert fp8.dtype == torch.float8_e4m3fn and fp8.shape == qkv.shape
    assert descale[1] > 5 * descale[0] and descale[1] > 5 * descale[2]
    restored = torch.cat([third.float() * s for third, s in zip(fp8.chunk(3, dim=-1), descale)], dim=-1)
    assert float((restored - qkv).norm() / qkv.norm()) < 0.05
    assert torch.allclose(experiment.dequantize_output(fp8[..., :heads * d], descale[2]).float(),
                          fp8[..., :heads * d].float() * descale[2], rtol=1e-2)


def test_cudnn_fp8_convolutions_scales_and_layout():
    """conv_cudnn_fp8_h200.py hands cuDNN NHWC e4m3 tensors and one descale per output channel (activation scale
    times weight scale): with those, the e4m3 convolution must give the bf16 one within fp8 rounding."""
    import torch.nn.functional as F

    sys.path.insert(0, str(BENCHMARKS))
    try:
        import conv_cudnn_fp8_h200  # noqa: F401 - the experiment imports on a CPU machine
        from conv_fp8_h200 import case, quantize_out_channels
        from kernel_bench import quantize_tensor, relative_error
    finally:
        sys.path.remove(str(BENCHMARKS))
    x, weight, bias = case(2, 8, 64, 32, 3, 1, "cpu")
    x_q, x_scale = quantize_tensor(x)
    w_q, w_scale = quantize_out_channels(weight)
    assert x_q.is_contiguous(memory_format=torch.channels_last)  # what the graph's strides describe
    assert w_q.is_contiguous(memory_format=torch.channels_last) and w_scale.shape == (32,)
    descale = (x_scale * w_scale).view(1, -1, 1, 1)
    out = F.conv2d(x_q.float(), w_q.float(), padding=1) * descale + bias.float().view(1, -1, 1, 1)
    assert relative_error(out, F.conv2d(x.float(), weight.float(), bias.float(), padding=1)) < 0.06


def test_fp8_resnet_norm_and_convolution_match_the_kits_ops():
    rows = interpreted_rows("resnet_fp8_h200.py")
    assert len(rows) == 2  # with the shift (a second norm) and without
    for name, bf16_error, fp8_error, torch_rounded_error in rows:
        assert float(bf16_error) < 0.01, name  # sccsdxl.group_norm's kernels writing bf16, then cuDNN's definition
        assert float(torch_rounded_error) < 0.06, name  # e4m3 activations (one scale) and weights, as in conv_fp8
        # the norm kernel's own e4m3: Triton 3.8's interpreter converts fp32 to e4m3 wrongly where rounding carries
        # into the exponent (7.92 -> 4 instead of 8; the GPU's cvt rounds right), which about doubles the error here
        assert float(fp8_error) < 0.1, name


def test_persistent_geglu_gemm_computes_the_kits_kernel():
    rows = interpreted_rows("geglu_gemm_h200.py")
    assert len(rows) == 2  # partial row tiles, several tiles per program, K steps of 64 and of 128
    for name, error, scales_equal in rows:
        assert float(error) < 1e-5 and scales_equal == "True", name
