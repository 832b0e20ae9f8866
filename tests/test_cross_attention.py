"""sccsdxl.cross_attention: the cross-attention kernel that writes the output projection's fp8 rows, against its
definition (SDPA, then e4m3 with one scale per image), in Triton's CPU interpreter and on a GPU; and fused_norms'
blocks with it."""
import textwrap

import pytest
import torch

from sccsdxl import cross_attention as X
from sccsdxl import fused
from sccsdxl.fused import cross_attend
from conftest import assert_interpreted_ok, relative_error
from test_fused import block_inputs, sdxl_block

gpu = pytest.mark.skipif(not fused.available(), reason="the kernel needs an NVIDIA GPU (run on the H200: BENCHMARKS.md)")


def attention_inputs(images: int, tokens: int, heads: int, head_size: int, keys: int = 77, device: str = "cpu"):
    """Queries as the q projection gives them and the text's fused k/v projection, values of varied sizes."""
    torch.manual_seed(5)
    width = heads * head_size
    query = torch.randn(images * tokens, width, device=device).to(torch.bfloat16)
    kv = torch.randn(images * keys, 2 * width, device=device) * torch.linspace(0.5, 3, images * keys,
                                                                               device=device)[:, None]
    return query, kv.to(torch.bfloat16)


def sdpa(query: torch.Tensor, kv: torch.Tensor, images: int, heads: int) -> torch.Tensor:
    """The attention in fp32: what the e4m3 outputs are measured against."""
    return cross_attend(query.float(), kv.float(), images, heads)


def test_the_reference_is_sdpa_in_e4m3_with_one_scale_per_image():
    query, kv = attention_inputs(3, 20, 4, 16)
    values, scales = X.cross_attention_fp8_rows(query, kv, 3, 4)  # on the CPU: the reference
    assert values.dtype == fused.FP8 and values.shape == query.shape and scales.shape == (60, 1)
    largest = kv.float().view(3, 77, 2, 64)[:, :, 1].abs().amax(dim=(1, 2))
    # largest / 448 as PyTorch computes it on a GPU (times 1 / 448 in fp32): within one rounding of the division
    assert torch.equal(scales.view(3, 20), (largest * X.INV_FP8_MAX).repeat_interleave(20).view(3, 20))
    assert torch.allclose(scales.view(3, 20)[:, 0], largest / fused.FP8_MAX, rtol=2 ** -23, atol=0)
    exact = sdpa(query, kv, 3, 4)
    assert relative_error(values.float() * scales, exact) < 0.05  # e4m3's rounding


def test_every_output_lies_within_its_images_largest_value():
    """Why one scale per image cannot overflow: softmax weights make each output a convex combination of values."""
    query, kv = attention_inputs(3, 50, 4, 16)
    query = query * 20  # sharp weights: outputs near single values
    exact = sdpa(query, kv, 3, 4).view(3, 50, 64)
    largest = kv.float().view(3, 77, 2, 64)[:, :, 1].abs().amax(dim=(1, 2))
    assert (exact.abs().amax(dim=(1, 2)) <= largest * (1 + 1e-6)).all()


INTERPRETED = textwrap.dedent("""
    import torch
    from sccsdxl import cross_attention as X
    from sccsdxl.fused import cross_attend

    torch.manual_seed(5)
    for images, tokens, heads, head_size, keys in ((2, 40, 2, 16, 77), (3, 16, 3, 32, 5)):
        width = heads * head_size
        query = torch.randn(images * tokens, width).to(torch.bfloat16)
        kv = (torch.randn(images * keys, 2 * width) * 2).to(torch.bfloat16)
        scale = X.image_scales(kv, images)
        # the op's scales, from a kernel of their own: what image_scales computes, to the bit
        by_kernel, inverse = X.scales_by_kernel(kv, images)
        assert torch.equal(by_kernel, scale) and torch.equal(inverse, 1.0 / scale), (by_kernel, scale)
        exact = cross_attend(query.float(), kv.float(), images, heads)
        # several blocks of tokens, the last one partial; one block per program, or several (the last program's
        # partly or wholly past the tokens)
        for bm, blocks in ((16, 1), (32, 1), (16, 2), (16, 3)):
            # fp32 output: the kernel's values before the e4m3 cast (the interpreter's own cast is not exact; the
            # hardware's is tested on the GPU)
            out = torch.full(query.shape, float("nan"))
            X.run_config(query, kv, 1.0 / scale, out, images, heads, bm, blocks)
            got = out * scale.repeat_interleave(tokens)[:, None]
            where = (images, tokens, heads, head_size, keys, bm, blocks)
            assert not got.isnan().any(), where  # every row and head written
            # the weights rounded to bf16 for the second product, as flash attention does
            assert float((got - exact).norm() / exact.norm()) < 0.01, where
            assert out.abs().max() <= 448, where
    kv = (torch.randn(3 * 77, 2 * 320) * 3).to(torch.bfloat16)  # several column steps, the last partial
    kv[77:154] = 0  # an image without values: the least scale, not 0
    by_kernel, inverse = X.scales_by_kernel(kv, 3)
    assert torch.equal(by_kernel, X.image_scales(kv, 3)) and by_kernel[1] > 0 and torch.equal(inverse, 1.0 / by_kernel)
    print("kernel ok")
""")


@pytest.mark.skipif(fused.triton is None or fused.available(),
                    reason="needs the triton package; on a GPU the tests below run the compiled kernel itself")
def test_the_kernel_in_tritons_cpu_interpreter_attends_each_head_of_each_image():
    assert_interpreted_ok(INTERPRETED)


@gpu
@pytest.mark.parametrize("tokens,heads", [(1024, 20), (4096, 10)])  # the UNet's two transformer levels
def test_the_kernel_computes_its_definition_on_the_gpu(tokens, heads):
    query, kv = attention_inputs(4, tokens, heads, 64, device="cuda")
    values, scales = X.cross_attention_fp8_rows(query, kv, 4, heads)
    ref_values, ref_scales = X.cross_attention_fp8_rows_reference(query, kv, 4, heads)
    assert torch.equal(scales, ref_scales)
    assert relative_error(values.float(), ref_values.float()) < 0.02  # e4m3 steps where the two round apart
    assert relative_error(values.float() * scales, sdpa(query, kv, 4, heads)) < 0.05
    # static shapes, as the kit compiles its blocks. Compiled, the op is opaque: the same tuned launch as the eager
    # call, so the same values (as a triton_op, inductor ran the kernel 2.6x slower, tuned it anew and, recompiling
    # with dynamic shapes, put a float in its grid: session 22)
    compiled = torch.compile(X.cross_attention_fp8_rows, fullgraph=True, dynamic=False)(query, kv, 4, heads)
    assert torch.equal(compiled[0].float(), values.float()) and torch.equal(compiled[1], scales)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=gpu)])
def test_a_block_with_the_fused_cross_attention_computes_what_it_computes_without(device):
    block = sdxl_block(device=device).to(torch.bfloat16)
    x, text = block_inputs(block, device=device)
    fp8_block = fused.Fp8TransformerBlock(block)
    with torch.no_grad():
        fp8_block.fused_cross_attention = False
        before = fp8_block(x, encoder_hidden_states=text)
        fp8_block.fused_cross_attention = True
        after = fp8_block(x, encoder_hidden_states=text)
    assert relative_error(after, before) < 0.02  # the same block; only the attention output's e4m3 scale differs
    assert not torch.equal(after, before)  # the switch took the other path


def test_the_switch_is_read_when_the_blocks_are_made():
    from test_fused import printed_per_switch

    source = "from sccsdxl import cross_attention as X; print(X.FUSED_CROSS_ATTENTION)"
    assert printed_per_switch(source, "SCCSDXL_FUSED_CROSS_ATTENTION", ("0", "1", "")) == {
        "0": ["False"], "1": ["True"], "": ["True"]}  # on unless =0
