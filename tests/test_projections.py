"""Option fp8_projections (sccsdxl.projections): each transformer's proj_in and proj_out in fp8, their inputs made
by the GroupNorm kernels in e4m3 and by the blocks' last residual add as fp8 rows; on the CPU (the swap and the
reference paths), in Triton's CPU interpreter and on a GPU."""
import copy
import textwrap

import pytest
import torch

from sccsdxl import fused, projections, quant
from sccsdxl import group_norm as G

from conftest import assert_interpreted_ok, relative_error, tiny_unet_swaps

gpu = pytest.mark.skipif(not fused.available(), reason="the Triton kernels need a GPU (run on the H200: BENCHMARKS.md)")
OPTIONS = "fuse_qkv,channels_last,fused_norms,fused_group_norms,fp8_projections"


def norm_and_input(channels: int = 64, size: int = 8, device: str = "cpu"):
    """An affine GroupNorm away from its 1 / 0 start and a channels_last input far from zero mean."""
    torch.manual_seed(3)
    norm = torch.nn.GroupNorm(32, channels, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(channels) + 0.5)
        norm.bias.copy_(torch.randn(channels) * 0.3)
    x = (torch.randn(2, channels, size, size) * 3 + 1).to(torch.bfloat16)
    return norm.to(device, torch.bfloat16), x.to(device).contiguous(memory_format=torch.channels_last)


def test_the_reference_is_the_group_norm_in_e4m3_with_one_scale():
    norm, x = norm_and_input()
    values, amax = G.group_norm_fp8(x, norm)  # on the CPU: the reference
    exact = G.group_norm_reference(x.float(), copy.deepcopy(norm).float())
    assert values.dtype == fused.FP8 and values.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(amax, exact.abs().amax().reshape(1))
    assert float(values.float().abs().max()) == fused.FP8_MAX  # the largest value at e4m3's top
    assert relative_error(values.float() * G.e4m3_scale(amax), exact) < 0.04  # e4m3's 3 mantissa bits


def test_add_fp8_rows_on_the_cpu_quantizes_the_sum_as_fp8_rows_does():
    torch.manual_seed(4)
    x, residual = (torch.randn(37, 96).to(torch.bfloat16) for _ in range(2))
    values, scales = fused.add_fp8_rows(x, residual)
    ref_values, ref_scales = fused.fp8_rows(x + residual)
    assert torch.equal(values.float(), ref_values.float()) and torch.equal(scales, ref_scales)


def test_the_swapped_transformers_compute_what_they_computed():
    """Every transformer of the tiny UNet swapped after fused_norms and fused_group_norms (fp8, a GPU option, left
    out: the swap and the CPU reference paths are what is tested), the UNet's output as before but for e4m3."""
    pipe, _, call, before, info = tiny_unet_swaps(OPTIONS)
    swapped = [m for m in pipe.unet.modules() if isinstance(m, projections.Fp8ProjectionsTransformer)]
    assert info["fp8_projections"] == len(swapped) > 0
    assert not any(type(m).__name__ == "Transformer2DModel" for m in pipe.unet.modules())
    assert all(isinstance(m.proj_in, fused.Fp8RowWeight) and isinstance(m.proj_out, fused.Fp8RowWeight)
               for m in swapped)
    after = call()
    assert relative_error(after, before) < 0.05
    # against the same UNet without the option, the two projections' e4m3 are all that differs
    _, _, call_without, _, _ = tiny_unet_swaps(OPTIONS.replace(",fp8_projections", ""))
    without = call_without()
    assert 0 < relative_error(after, without) < 0.05


def test_compile_takes_the_swapped_transformers_which_trace_as_one_graph():
    pipe, _, _, _, _ = tiny_unet_swaps(OPTIONS)
    transformer = next(m for m in pipe.unet.modules() if isinstance(m, projections.Fp8ProjectionsTransformer))
    channels = transformer.norm.num_channels
    torch.manual_seed(0)
    hidden = torch.randn(2, channels, 4, 4, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    text = torch.randn(2, 77, transformer.transformer_blocks[0].blocks[0].kv2.in_features, dtype=torch.bfloat16)
    calls = []  # the chain runs through its call, so that compile without compile_transformers takes its region
    transformer.transformer_blocks[0].register_forward_hook(lambda *args: calls.append(1))
    with torch.inference_mode():  # return_dict=False, as the UNet calls it
        eager = transformer(hidden, encoder_hidden_states=text, return_dict=False)[0]
    assert calls == [1]
    with torch.inference_mode():
        traced = torch.compile(transformer, fullgraph=True, backend="aot_eager")(hidden, encoder_hidden_states=text,
                                                                                  return_dict=False)[0]
    assert torch.equal(traced, eager) and eager.is_contiguous(memory_format=torch.channels_last)
    count = sum(isinstance(m, projections.Fp8ProjectionsTransformer) for m in pipe.unet.modules())
    with quant.own_inductor_settings():
        assert quant.compile_regions(pipe.unet, resnets=False, cuda_graphs=False, transformers=True) == count


def test_transformers_unlike_sdxls_are_left_as_they_are():
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    conv_projections = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=16,
                                          norm_num_groups=4, cross_attention_dim=8, use_linear_projection=False)
    assert not projections.can_take_transformer(conv_projections)
    # nor one whose blocks fused_norms has not chained
    linear = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=16, norm_num_groups=4,
                                cross_attention_dim=8, use_linear_projection=True)
    assert not projections.can_take_transformer(linear)


def test_the_option_needs_fused_norms_and_fused_group_norms_and_says_so():
    with pytest.raises(Exception, match="fp8_projections has .* add fused_norms .* and fused_group_norms"):
        quant.check_optimizations(quant.parse_optimizations("fp8_projections"), "bf16", "cpu")
    assert "fp8_projections" not in quant.supported_options("cpu")


INTERPRETED = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    from sccsdxl import fused, group_norm as G

    torch.manual_seed(0)
    for n, c, h, w, groups in ((2, 64, 8, 8, 32), (1, 130, 5, 3, 2)):  # masked channels, uneven slices
        norm = torch.nn.GroupNorm(groups, c, eps=1e-6)
        with torch.no_grad():
            norm.weight.copy_(torch.rand(c) + 0.5)
            norm.bias.copy_(torch.randn(c) * 0.3)
        norm = norm.to(torch.bfloat16)
        x = (torch.randn(n, c, h, w) * 3 + 1).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        exact = F.group_norm(x.float(), groups, norm.weight.float(), norm.bias.float(), norm.eps)
        for stat, write in (((32, 64), (32, 64)), ((8, 64, 4, 3), (16, 128))):
            # fp32 output: the kernels' values before the e4m3 cast (the interpreter's own cast is not exact; the
            # hardware's is tested on the GPU)
            out = torch.full_like(x, float("nan"), dtype=torch.float32)
            amax = torch.zeros(1)
            G.run_fp8_config(x, norm, out, amax, stat, write)
            # the largest value from the statistics' extremes, not from a pass over the output
            assert abs(float(amax) - float(exact.abs().max())) <= 1e-5 * float(amax), (float(amax), stat)
            assert float((out * G.e4m3_scale(amax) - exact).norm() / exact.norm()) < 1e-5, (c, stat, write)
            assert float(out.abs().max()) <= 448 * (1 + 1e-6)
    # the last residual add as fp8 rows: several rows per program, the last program's partly past the rows
    x, residual = (torch.randn(37, 96).to(torch.bfloat16) for _ in range(2))
    for rows in (1, 4, 8):
        values, scales = torch.full((37, 96), float("nan")), torch.empty(37, 1)
        fused.run_rows_config(x, values, scales, rows, residual=residual)
        total = x.float() + residual.float()
        assert not values.isnan().any()
        # the interpreter rounds the sum to bf16 toward zero (the GPU to nearest): within two bf16 steps
        assert torch.allclose(scales, total.abs().amax(1, keepdim=True) / 448, rtol=2 ** -7)
        assert float((values * scales - total).norm() / total.norm()) < 2 ** -7
    print("kernel ok")
""")


@pytest.mark.skipif(fused.triton is None or fused.available(),
                    reason="needs the triton package; on a GPU the tests below run the compiled kernels themselves")
def test_kernels_in_tritons_cpu_interpreter():
    assert_interpreted_ok(INTERPRETED, timeout=600)


@gpu
@pytest.mark.parametrize("channels, size", [(640, 64), (1280, 32)])  # SDXL's two transformer levels
def test_the_group_norm_in_e4m3_matches_the_reference_on_the_gpu(channels, size):
    norm, x = norm_and_input(channels, size, "cuda")
    values, amax = G.group_norm_fp8(x, norm)
    exact = G.group_norm_reference(x.float(), copy.deepcopy(norm).float())
    assert values.dtype == fused.FP8 and values.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(amax, exact.abs().amax().reshape(1), rtol=1e-4)  # the statistics merged otherwise
    assert relative_error(values.float() * G.e4m3_scale(amax), exact) < 0.04
    for stat, write in G.each_tuning_choice():  # every configuration the tuning may pick, of each kernel
        out, got_amax = torch.empty_like(values), torch.zeros_like(amax)
        G.run_fp8_config(x, norm, out, got_amax, stat, write)
        assert relative_error(out.float() * G.e4m3_scale(got_amax), exact) < 0.04, (stat, write)


@gpu
@pytest.mark.parametrize("n_cols", [1280, 640])
def test_add_fp8_rows_matches_the_reference_on_the_gpu(n_cols):
    from test_fused import assert_close_to_reference

    torch.manual_seed(5)
    x, residual = ((torch.randn(1003, n_cols, device="cuda") * 3).to(torch.bfloat16) for _ in range(2))
    ref_values, ref_scales = fused.quantize_rows(x + residual)
    assert_close_to_reference(*fused.add_fp8_rows(x, residual), ref_values, ref_scales)
    for config in fused._fp8_rows_kernel.configs:
        values, scales = torch.empty_like(ref_values), torch.empty_like(ref_scales)
        fused.run_rows_config(x, values, scales, config.kwargs["ROWS"], config.num_warps, residual=residual)
        assert_close_to_reference(values, scales, ref_values, ref_scales)


@gpu
def test_the_compiled_unet_with_the_option_agrees_on_the_gpu():
    """The tiny UNet with fp8 and the option, compiled as the kit compiles it, against the same without the
    option: only the two projections' e4m3 differs."""
    from conftest import tiny_unet_call
    from sccsdxl.pipeline import build_random_pipeline

    outputs = []
    for options in (OPTIONS, OPTIONS.replace(",fp8_projections", "")):
        pipe = build_random_pipeline("tiny", "bf16", "cuda")
        with quant.own_inductor_settings():
            quant.apply_optimizations(pipe, quant.parse_optimizations(options + ",fp8,compile,compile_transformers"))
            outputs.append(tiny_unet_call(pipe.unet, "cuda")())
    assert 0 < relative_error(outputs[0], outputs[1]) < 0.05
