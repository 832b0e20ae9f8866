"""The feed-forward as one GEGLU GEMM kernel and a blockwise down projection (option fused_ffn_gemm): the modules on
the CPU, the kernel in Triton's CPU interpreter, and on a GPU."""
import textwrap

import pytest
import torch
import torch.nn.functional as F

from sccsdxl import ffn_gemm as G
from sccsdxl import fused, quant

from conftest import assert_interpreted_ok, relative_error, tiny_unet_swaps


def feed_forward(width: int = 64, device: str = "cpu"):
    """diffusers' GEGLU FeedForward (width -> 2 x 4 width -> width), as every SDXL transformer block has."""
    from diffusers.models.attention import FeedForward

    torch.manual_seed(0)
    return FeedForward(width, mult=4, activation_fn="geglu").to(device, torch.bfloat16).eval().requires_grad_(False)


def test_row_blocks_keep_one_scale_per_row_of_each_128_columns():
    matrix = torch.randn(5, 384)
    matrix[2, 130] = 1000.0  # one large value: only its own block's scale may grow
    values, scales = G.quantize_row_blocks(matrix)
    assert values.dtype == fused.FP8 and scales.shape == (5, 3)
    assert scales[2, 1] == pytest.approx(1000.0 / fused.FP8_MAX)
    assert scales[2, 0] < 0.1 and scales[2, 2] < 0.1 and scales[1, 1] < 0.1
    assert relative_error(G.dequantize_row_blocks(values, scales), matrix) < 0.05


def test_block_weight_scales_each_128_square_and_keeps_partial_blocks():
    linear = torch.nn.Linear(256, 64)  # 64 outputs: half a block
    with torch.no_grad():
        linear.weight[:, 128:] *= 100  # the second column of blocks a hundred times larger
    weight = G.Fp8BlockWeight(linear)
    assert weight.scale.shape == (1, 2) and weight.scale[0, 1] > 50 * weight.scale[0, 0]
    assert relative_error(weight.dequantized()[:, :128], linear.weight[:, :128]) < 0.05  # not drowned by the rest
    x = torch.randn(3, 256)
    values, scales = G.quantize_row_blocks(x)
    assert relative_error(weight.matmul(values, scales, torch.float32), linear(x)) < 0.08


def test_the_feed_forward_computes_diffusers_geglu_feed_forward():
    ff = feed_forward()
    assert G.can_fuse_feed_forward(ff)
    x = torch.randn(2, 9, 64).to(torch.bfloat16)
    with torch.no_grad():
        expected = ff(x)
        got = G.Fp8GegluGemmFeedForward(ff)(x)
    assert got.shape == expected.shape and got.dtype == torch.bfloat16
    assert relative_error(got, expected) < 0.08  # e4m3 in both projections


def test_only_feed_forwards_of_whole_128_column_blocks_are_taken():
    from diffusers.models.attention import FeedForward

    assert not G.can_fuse_feed_forward(FeedForward(16, mult=4, activation_fn="geglu"))  # a GEGLU width of 64
    assert not G.can_fuse_feed_forward(FeedForward(32, mult=4, activation_fn="geglu"))  # one block: read per row
    assert not G.can_fuse_feed_forward(FeedForward(96, mult=4, activation_fn="geglu"))  # 96 wide: no 64-wide steps
    assert G.can_fuse_feed_forward(FeedForward(128, mult=4, activation_fn="geglu"))
    assert not G.can_fuse_feed_forward(FeedForward(64, mult=4, activation_fn="gelu"))  # no GEGLU
    assert not G.can_fuse_feed_forward(torch.nn.Linear(4, 4))


def test_fused_norms_takes_the_feed_forward_and_feeds_it_its_fp8_rows():
    """fused_ffn_gemm swaps the feed-forwards before fused_norms, whose blocks then hand the norm kernel's fp8 rows
    straight to it (fp8 itself, a GPU option, is left out: the swaps are what is tested)."""
    pipe, blocks, call, before, info = tiny_unet_swaps("fuse_qkv,fused_ffn_gemm,fused_norms")
    assert info["fused_ffn_gemms"] == info["fused_blocks"] == blocks > 0
    fused_blocks = [m for m in pipe.unet.modules() if isinstance(m, fused.Fp8TransformerBlock)]
    assert all(isinstance(b.feed_forward, G.Fp8GegluGemmFeedForward) and b.up is None for b in fused_blocks)
    taken = []
    for block in fused_blocks:
        block.feed_forward.register_forward_hook(lambda *args: taken.append("forward"))  # the path fused_norms skips
        original = block.feed_forward.from_fp8
        block.feed_forward.from_fp8 = lambda *a, original=original: taken.append("fp8 rows") or original(*a)
    after = call()
    assert taken == ["fp8 rows"] * blocks
    assert relative_error(after, before) < 0.05


INTERPRETED = textwrap.dedent("""
    import torch
    from diffusers.models.attention import FeedForward
    from sccsdxl import ffn_gemm as G, fused

    torch.manual_seed(0)
    for rows, width, block_m, block_k in ((40, 64, 16, 32), (70, 128, 32, 64)):  # partial row tiles in both
        up = G.Fp8GegluGemmFeedForward(FeedForward(width, mult=4, activation_fn="geglu").to(torch.bfloat16)).up
        values, scales = fused.quantize_rows(torch.randn(rows, width).to(torch.bfloat16))
        geglu = G.geglu_reference(values, scales, up)
        expected_scales = G.quantize_row_blocks(geglu)[1]
        # fp32 output: the kernel's values before the e4m3 cast (the interpreter's own cast is not exact)
        got, got_scales = G.run_geglu_gemm_config(values, scales, up, block_m, block_k, group_m=2,
                                                  out_dtype=torch.float32)
        where = (rows, width)
        assert got_scales.shape == expected_scales.shape and got_scales.stride(0) == 1, where  # rows contiguous
        assert torch.allclose(got_scales, expected_scales, rtol=1e-5), where
        assert got.abs().max() <= fused.FP8_MAX, where
        error = (G.dequantize_row_blocks(got, got_scales) - geglu).abs().max() / geglu.abs().max()
        assert error < 1e-5, (where, float(error))
        plain = torch.empty(rows, 4 * width)  # without block scales: the GEGLU as it is (what the benchmark times)
        G._launch(G._geglu_gemm_kernel.fn, values, scales, up.weight, up.scale, up.bias, plain, None, BM=block_m,
                  BK=block_k, GROUP_M=2, num_warps=4)
        assert (plain - geglu).abs().max() / geglu.abs().max() < 1e-5, where
    print("kernel ok")
""")


@pytest.mark.skipif(fused.triton is None or fused.available(),
                    reason="needs the triton package; on a GPU the tests below run the compiled kernel itself")
def test_kernel_in_tritons_cpu_interpreter_computes_both_halves_bias_and_block_scales():
    assert_interpreted_ok(INTERPRETED)


gpu = pytest.mark.skipif(not G.blockwise_gemm_available(),
                         reason="the kernel and cuBLAS's blockwise fp8 GEMM need a Hopper GPU (run on the H200)")


@gpu
@pytest.mark.parametrize("rows, width", [(1000, 640), (513, 1280)])  # SDXL's two widths, rows not a tile multiple
def test_kernel_and_blockwise_gemm_match_the_reference_on_the_gpu(rows, width):
    module = G.Fp8GegluGemmFeedForward(feed_forward(width, "cuda"))
    torch.manual_seed(3)
    values, scales = fused.quantize_rows(torch.randn(rows, width, device="cuda").to(torch.bfloat16))
    expected_values, expected_scales = G.geglu_fp8_blocks_reference(values, scales, module.up)
    expected = G.dequantize_row_blocks(expected_values, expected_scales)
    got_values, got_scales = G.geglu_fp8_blocks(values, scales, module.up)  # the autotuned choice
    # not closer: Hopper's fp8 tensor cores accumulate with fewer bits than fp32 (on the H200 1e-4 failed), and
    # each scale is its 128 values' largest
    torch.testing.assert_close(got_scales, expected_scales, rtol=1e-2, atol=0)
    assert relative_error(G.dequantize_row_blocks(got_values, got_scales), expected) < 0.01
    for config in G._configs():  # and every tile it chooses from
        got_values, got_scales = G.run_geglu_gemm_config(values, scales, module.up, config.kwargs["BM"],
                                                         config.kwargs["BK"], config.num_warps,
                                                         num_stages=config.num_stages)
        assert relative_error(G.dequantize_row_blocks(got_values, got_scales), expected) < 0.01, config
    # cuBLAS reads the block scales as meant: the same product as from the dequantized values
    out = module.down.matmul(expected_values, expected_scales, torch.float32)
    dequantized = F.linear(expected, module.down.dequantized(), module.down.bias.float())
    assert relative_error(out, dequantized) < 0.01


def fused_transformer(device: str):
    """A Transformer2DModel of two SDXL-like blocks, 128 wide (a GEGLU width of 512: 128 x 128 weight blocks four to a
    row of scales, 16 bytes, as cuBLAS reads them; SDXL's have 20 and 40), q/k/v fused, then both swaps."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    torch.manual_seed(0)
    model = Transformer2DModel(num_attention_heads=2, attention_head_dim=64, in_channels=128, cross_attention_dim=64,
                               use_linear_projection=True, norm_num_groups=32, num_layers=2)
    model = model.to(device, torch.bfloat16).eval().requires_grad_(False)
    for module in model.modules():
        if isinstance(module, Attention):
            module.fuse_projections()
    assert G.fuse_feed_forward_gemms(model) == fused.fuse_transformer_blocks(model) == 2
    inputs = (torch.randn(2, 128, 8, 8, device=device, dtype=torch.bfloat16),)
    return model, inputs, {"encoder_hidden_states": torch.randn(2, 77, 64, device=device, dtype=torch.bfloat16),
                           "return_dict": False}


@gpu
def test_compiled_blocks_run_the_kernel_and_agree_with_eager():
    model, args, kwargs = fused_transformer("cuda")
    with torch.inference_mode():
        eager = model(*args, **kwargs)[0]
        compiled = torch.compile(model, fullgraph=True)(*args, **kwargs)[0]
    assert relative_error(compiled, eager) < 0.01
