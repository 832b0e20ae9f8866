"""The VAE decoder's attention as two GEMMs (option vae_attention_gemms): the same result as diffusers' attention."""
import copy

import pytest
import torch
import torch.nn.functional as F

from sccsdxl import vae_attention as V
from sccsdxl.errors import ParameterError
from sccsdxl.pipeline import build_random_pipeline
from sccsdxl.quant import apply_optimizations, check_optimizations, parse_optimizations

from conftest import relative_error, tiny_vae_decode


@pytest.mark.parametrize("images, chunk", [(5, 2), (3, 5), (4, 1)])  # a last chunk short, one chunk, one each
def test_attention_by_gemms_is_scaled_dot_product_attention(images, chunk):
    torch.manual_seed(0)
    q, k, v = (torch.randn(images, 40, 24) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(V.attention_by_gemms(q, k, v, 24 ** -0.5, chunk), expected, atol=1e-5)


def tiny_decode(fuse_qkv: bool):
    pipe = build_random_pipeline("tiny", "fp32", "cpu")
    if fuse_qkv:
        pipe.fuse_qkv_projections()
    return pipe, tiny_vae_decode(pipe, images=3)


@pytest.mark.parametrize("fuse_qkv", [False, True])
def test_the_decoder_decodes_the_same_with_its_attention_swapped(fuse_qkv):
    pipe, decode = tiny_decode(fuse_qkv)
    decoder = pipe.vae.decoder
    assert getattr(decoder.mid_block.attentions[0], "fused_projections", False) == fuse_qkv
    with torch.no_grad():
        before = decode()
        assert V.swap_vae_attention(decoder) == 1
        assert isinstance(decoder.mid_block.attentions[0], V.GemmAttention)
        assert relative_error(decode(), before) < 1e-5


def test_attentions_unlike_the_vaes_are_left_alone():
    from diffusers.models.attention_processor import Attention

    vae_like = dict(query_dim=32, heads=1, dim_head=32, norm_num_groups=8, residual_connection=True, bias=True,
                    upcast_softmax=True, _from_deprecated_attn_block=True)
    assert V.can_take(Attention(**vae_like))
    for changed in (dict(heads=2, dim_head=16), dict(norm_num_groups=None), dict(residual_connection=False),
                    dict(cross_attention_dim=16), dict(spatial_norm_dim=4)):
        assert not V.can_take(Attention(**{**vae_like, **changed})), changed


def test_the_swapped_attention_traces_as_one_graph():
    """compile_vae compiles each GemmAttention whole (here the CPU path)."""
    pipe, _ = tiny_decode(False)
    module = V.GemmAttention(pipe.vae.decoder.mid_block.attentions[0])
    x = torch.randn(7, module.attention.group_norm.num_channels, 4, 4)  # 7 images: chunks of 5 and 2
    compiled = torch.compile(copy.deepcopy(module), backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(x), module(x), atol=1e-5)


def test_the_option_is_applied_and_needs_compile_vae():
    with pytest.raises(ParameterError, match="add compile_vae"):
        check_optimizations(parse_optimizations("vae_attention_gemms"), "fp32", "cpu")
    check_optimizations(parse_optimizations("compile_vae,vae_attention_gemms"), "fp32", "cpu")
    pipe, _ = tiny_decode(False)
    info = apply_optimizations(pipe, parse_optimizations("vae_attention_gemms"))
    assert info["vae_attention_gemms"] == 1


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run on the H200)")


@gpu
def test_compiled_swapped_attention_agrees_with_diffusers_on_the_gpu():
    """bf16 at the decoder's mid-block width (512, one head), 6 images of 32x32 pixels: chunks of 5 and 1."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attention = Attention(query_dim=512, heads=1, dim_head=512, norm_num_groups=32, residual_connection=True,
                          bias=True, upcast_softmax=True, _from_deprecated_attn_block=True, eps=1e-6)
    attention = attention.to("cuda", torch.bfloat16).eval()
    x = torch.randn(6, 512, 32, 32, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        expected = attention(x)
        got = torch.compile(V.GemmAttention(attention), fullgraph=True)(x)
    assert relative_error(got, expected) < 1e-2
