"""The fp8 row-quantization kernels (options fused_geglu, fp8_attn_out): their definitions and modules on the CPU,
the kernels in Triton's CPU interpreter, and on a GPU."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from sccsdxl import fused
from sccsdxl.pipeline import build_random_pipeline

from conftest import tiny_unet_call


def feed_forward(dim: int = 64, dtype=torch.bfloat16):
    from diffusers.models.attention import FeedForward

    torch.manual_seed(0)
    return FeedForward(dim, activation_fn="geglu").to(dtype).eval()


def geglu(hidden: torch.Tensor) -> torch.Tensor:
    value, gate = hidden.float().chunk(2, dim=-1)
    return value * F.gelu(gate)


def relative_error(test: torch.Tensor, reference: torch.Tensor) -> float:
    return float((test.float() - reference.float()).norm() / reference.float().norm())


def test_reference_rows_dequantize_to_geglu_within_fp8_precision():
    hidden = torch.randn(16, 2 * 96) * torch.logspace(-3, 2, 16)[:, None]  # rows of very different size
    values, scales = fused.geglu_fp8_rows_reference(hidden)
    assert values.dtype == torch.float8_e4m3fn and values.shape == (16, 96) and scales.shape == (16, 1)
    exact = geglu(hidden)
    assert torch.allclose(scales[:, 0], exact.abs().amax(dim=1) / fused.FP8_MAX)  # each row's largest maps to 448
    # e4m3 keeps 3 mantissa bits: each value within 1/16 of itself, or of the row's smallest normal step
    error = (values.float() * scales - exact).abs()
    assert (error <= exact.abs() / 16 + scales * 2**-6).all()


def test_an_all_zero_row_stays_finite():
    hidden = torch.randn(3, 64)
    hidden[1] = 0
    values, scales = fused.geglu_fp8_rows(hidden)
    assert torch.isfinite(values.float()).all() and scales[1, 0] == fused.MIN_SCALE and (values[1].float() == 0).all()


def test_fused_feed_forward_matches_diffusers_feed_forward():
    original = feed_forward()
    fast = fused.Fp8GegluFeedForward(original)
    x = torch.randn(2, 10, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        expected, got = original(x), fast(x)
    assert got.shape == expected.shape and got.dtype == torch.bfloat16
    assert relative_error(got, expected) < 0.05  # fp8 rounding of the activations and the down weight
    assert fast.down.weight.dtype == torch.float8_e4m3fn and fast.proj is original.net[0].proj


def test_every_unet_feed_forward_is_swapped_and_the_unet_still_agrees():
    unet = build_random_pipeline("tiny", "bf16", "cpu").unet
    count = sum(fused.is_geglu_feed_forward(m) for m in unet.modules())
    call = tiny_unet_call(unet)
    before = call()
    assert fused.fuse_geglu_feed_forwards(unet) == count > 0
    after = call()
    assert not any(fused.is_geglu_feed_forward(m) for m in unet.modules())
    assert sum(isinstance(m, fused.Fp8GegluFeedForward) for m in unet.modules()) == count
    assert relative_error(after, before) < 0.05


def test_fp8_rows_on_the_cpu_is_torchaos_per_row_quantization():
    matrix = torch.randn(6, 40, dtype=torch.bfloat16) * torch.logspace(-2, 2, 6, dtype=torch.bfloat16)[:, None]
    values, scales = fused.fp8_rows(matrix)
    assert values.dtype == torch.float8_e4m3fn and values.shape == (6, 40) and scales.shape == (6, 1)
    assert torch.allclose(scales[:, 0], matrix.float().abs().amax(dim=1) / fused.FP8_MAX)
    error = (values.float() * scales - matrix.float()).abs()
    assert (error <= matrix.float().abs() / 16 + scales * 2**-6).all()


def test_fp8_rows_linear_matches_the_linear():
    torch.manual_seed(4)
    linear = torch.nn.Linear(64, 48).to(torch.bfloat16)
    fast = fused.Fp8RowsLinear(linear)
    x = torch.randn(2, 10, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        expected, got = linear(x), fast(x)
    assert got.shape == expected.shape == (2, 10, 48) and got.dtype == torch.bfloat16
    assert relative_error(got, expected) < 0.05  # fp8 rounding of the activations and the weight
    assert fast.linear.weight.dtype == torch.float8_e4m3fn and fast.linear.bias is linear.bias


def test_every_block_attention_output_is_swapped_and_the_unet_still_agrees():
    unet = build_random_pipeline("tiny", "bf16", "cpu").unet
    in_blocks = [m for name, m in unet.named_modules() if type(m).__name__ == "Attention" and "transformer_blocks." in name]
    call = tiny_unet_call(unet)
    before = call()
    assert fused.quantize_attention_outputs(unet, "transformer_blocks.") == len(in_blocks) > 0
    after = call()
    assert all(isinstance(m.to_out[0], fused.Fp8RowsLinear) for m in in_blocks)
    outside = [m for name, m in unet.named_modules() if type(m).__name__ == "Attention" and m not in in_blocks]
    assert all(isinstance(m.to_out[0], torch.nn.Linear) for m in outside)
    # what quant_all_linears then hands torchao: the swapped projections are not quantized a second time
    from sccsdxl.quant import _in_blocks

    assert not any(_in_blocks(m, name) for name, m in unet.named_modules() if ".to_out." in name)
    assert any(_in_blocks(m, name) for name, m in unet.named_modules())
    assert relative_error(after, before) < 0.05


INTERPRETED = textwrap.dedent("""
    import torch
    from sccsdxl import fused

    torch.manual_seed(3)
    strategies = {"padded one pass": dict(CHUNK=0, SPLIT=False), "head + tail one pass": dict(CHUNK=0, SPLIT=True),
                  "two passes": dict(CHUNK=32, SPLIT=False)}
    for rows, n_cols in ((5, 100), (3, 96), (2, 128)):  # a masked tail, an exact tail, no tail
        hidden = (torch.randn(rows, 2 * n_cols) * 3).to(torch.bfloat16)
        value, gate = hidden.float().chunk(2, dim=-1)
        exact = value * torch.nn.functional.gelu(gate)
        ref_scales = exact.abs().amax(dim=1, keepdim=True) / fused.FP8_MAX
        for name, strategy in strategies.items():
            # fp32 output: the kernel's values before the fp8 cast (the interpreter's own cast is not exact; the
            # hardware's is tested on the GPU)
            values = torch.full((rows, n_cols), float("nan"))
            scales = torch.zeros(rows, 1)
            fused.run_strategy(hidden, values, scales, **strategy)
            where = (name, n_cols)
            assert torch.allclose(scales, ref_scales, rtol=1e-5), where
            assert torch.allclose(values, exact / ref_scales, rtol=1e-4, atol=1e-3), where  # every column written
            assert values.abs().amax(dim=1).sub(fused.FP8_MAX).abs().max() < 1e-2, where  # the largest maps to 448
    for rows, n_cols in ((7, 100), (4, 64)):  # the plain row kernel: a masked tail and a last partial program
        matrix = (torch.randn(rows, n_cols) * torch.logspace(-1, 1, rows)[:, None]).to(torch.bfloat16)
        ref_scales = matrix.float().abs().amax(dim=1, keepdim=True) / fused.FP8_MAX
        for per_program in (1, 2, 4):
            values = torch.full((rows, n_cols), float("nan"))
            scales = torch.zeros(rows, 1)
            fused.run_rows_config(matrix, values, scales, rows=per_program)
            where = ("rows", n_cols, per_program)
            assert torch.allclose(scales, ref_scales, rtol=1e-5), where
            assert torch.allclose(values, matrix.float() / ref_scales, rtol=1e-4, atol=1e-3), where
    print("kernel ok")
""")


@pytest.mark.skipif(fused.triton is None or fused.available(),
                    reason="needs the triton package; on a GPU the tests below run the compiled kernel itself (older "
                           "Triton interpreters, e.g. with torch 2.11, cannot run it)")
def test_kernels_in_tritons_cpu_interpreter_read_the_right_halves_rows_and_columns():
    """The Triton kernels themselves, run by Triton's interpreter on the CPU: indexing, masks and both strategies."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "kernel ok" in done.stdout, done.stderr[-2000:]


gpu = pytest.mark.skipif(not fused.available(), reason="the Triton kernel needs a GPU (run on the H200: BENCHMARKS.md)")


def assert_close_to_reference(values, scales, ref_values, ref_scales):
    assert torch.allclose(scales, ref_scales, rtol=1e-5)
    # erf and division may differ in the last fp32 bits between Triton and torch: a value on a rounding edge may
    # move one fp8 step
    differ = values.float() != ref_values.float()
    assert differ.float().mean() < 1e-3
    step = (ref_values.float().abs() / 8).clamp(min=2**-9)
    assert ((values.float() - ref_values.float()).abs()[differ] <= step[differ] + 1e-6).all()


@gpu
@pytest.mark.parametrize("n_cols", [2560, 5120, 1000])  # SDXL's two widths, and one that is not a power of two
def test_kernel_matches_the_reference(n_cols):
    torch.manual_seed(2)
    hidden = (torch.randn(512, 2 * n_cols, device="cuda") * 3).to(torch.bfloat16)
    ref_values, ref_scales = fused.geglu_fp8_rows_reference(hidden)
    assert_close_to_reference(*fused.geglu_fp8_rows(hidden), ref_values, ref_scales)  # the autotuned choice
    for config in fused._configs():  # and every strategy it chooses from
        values = torch.empty_like(ref_values)
        scales = torch.empty_like(ref_scales)
        fused.run_strategy(hidden, values, scales, num_warps=config.num_warps, **config.kwargs)
        assert_close_to_reference(values, scales, ref_values, ref_scales)


@gpu
@pytest.mark.parametrize("n_cols", [1280, 640, 1000])  # SDXL's two attention widths, and one that is not a power of two
def test_row_kernel_matches_the_reference(n_cols):
    torch.manual_seed(5)
    matrix = (torch.randn(1003, n_cols, device="cuda") * 3).to(torch.bfloat16)
    ref_values, ref_scales = fused.quantize_rows(matrix)
    values, scales = fused.fp8_rows(matrix)  # the autotuned choice
    assert_close_to_reference(values, scales, ref_values, ref_scales)
    for config in fused._fp8_rows_kernel.configs:  # and every configuration it chooses from
        values = torch.empty_like(ref_values)
        scales = torch.empty_like(ref_scales)
        fused.run_rows_config(matrix, values, scales, rows=config.kwargs["ROWS"], num_warps=config.num_warps)
        assert_close_to_reference(values, scales, ref_values, ref_scales)


@gpu
def test_compiled_fp8_rows_linear_matches_eager():
    torch.manual_seed(6)
    linear = torch.nn.Linear(640, 640).to(torch.bfloat16).cuda()
    fast = fused.Fp8RowsLinear(linear)
    x = torch.randn(4, 256, 640, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        eager = fast(x)
        compiled = torch.compile(fast, fullgraph=True)(x)
        expected = linear(x)
    assert relative_error(compiled, eager) < 1e-2
    assert relative_error(eager, expected) < 0.05


@gpu
def test_compiled_fused_feed_forward_matches_eager():
    fast = fused.Fp8GegluFeedForward(feed_forward(640).cuda())
    x = torch.randn(4, 256, 640, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        eager = fast(x)
        compiled = torch.compile(fast, fullgraph=True)(x)
        expected = feed_forward(640).cuda()(x)
    assert relative_error(compiled, eager) < 1e-2
    assert relative_error(eager, expected) < 0.05


WARM_CACHE_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from torch._dynamo.utils import counters
    from diffusers.models.attention import FeedForward
    from sccsdxl import fused
    from sccsdxl.quant import use_compile_cache

    use_compile_cache(sys.argv[1])
    torch.manual_seed(0)
    module = torch.nn.Sequential(  # both kernels: the feed-forward's, then the plain row kernel's linear
        fused.Fp8GegluFeedForward(FeedForward(640, activation_fn="geglu").to(torch.bfloat16).cuda().eval()),
        fused.Fp8RowsLinear(torch.nn.Linear(640, 640).to(torch.bfloat16).cuda()))
    x = torch.randn(2, 256, 640, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        out = torch.compile(module, fullgraph=True)(x)
    hits = counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]
    print(json.dumps({"sum": float(out.float().sum()), "cache_hits": hits}))
""")


@gpu
def test_compiled_fused_modules_start_warm_from_the_disk_cache_in_a_new_process(cache_in_two_processes):
    """What 04's warm start does: a second process must load the compiled graph holding the kernels from the cache."""
    runs = cache_in_two_processes(WARM_CACHE_SCRIPT)
    assert runs[1]["cache_hits"] > 0  # the second process loaded the graph, it did not compile it again
    assert runs[1]["sum"] == pytest.approx(runs[0]["sum"], rel=1e-3)
