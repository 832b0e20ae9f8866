"""Option concat_in_resnets: the up blocks' skip concatenations moved into their ResNet blocks, the same result."""
import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D

from sccsdxl import fused
from sccsdxl import skip_concat as S
from sccsdxl.errors import ParameterError
from sccsdxl.pipeline import build_random_pipeline
from sccsdxl.quant import apply_optimizations, check_optimizations, compile_regions, parse_optimizations

from conftest import relative_error, tiny_unet_call


def up_block_resnets(unet) -> list:
    return [resnet for block in unet.up_blocks for resnet in block.resnets]


@pytest.mark.parametrize("layout", ["", "channels_last,"])
def test_the_tiny_unet_gives_exactly_the_same_with_the_option(layout):
    pipe = build_random_pipeline("tiny", "fp32", "cpu")
    forward = tiny_unet_call(pipe.unet, dtype=torch.float32)
    apply_optimizations(pipe, parse_optimizations(layout.rstrip(",")))
    before = forward()
    resnets = up_block_resnets(pipe.unet)
    info = apply_optimizations(pipe, parse_optimizations("concat_in_resnets"))
    assert info["concat_in_resnets"] == len(resnets) > 0
    assert all(isinstance(r, S.ConcatResnet) and r.resnet is original for r, original
               in zip(up_block_resnets(pipe.unet), resnets))
    assert torch.equal(forward(), before)


def test_each_concat_resnet_is_one_compiled_region_holding_its_block():
    pipe = build_random_pipeline("tiny", "fp32", "cpu")
    regions = compile_regions(pipe.unet, resnets=True, cuda_graphs=False)
    pipe = build_random_pipeline("tiny", "fp32", "cpu")
    S.concat_in_resnets(pipe.unet)
    assert compile_regions(pipe.unet, resnets=True, cuda_graphs=False) == regions
    for wrapper in up_block_resnets(pipe.unet):
        assert wrapper._compiled_call_impl is not None and wrapper.resnet._compiled_call_impl is None


def test_compiled_by_inductor_the_concatenation_keeps_channels_last():
    """What compile_resnets makes of a ConcatResnet (here the CPU's inductor): the same values, NHWC throughout."""
    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=24, out_channels=8, temb_channels=16, groups=4).to(
        memory_format=torch.channels_last).eval()
    wrapper = S.ConcatResnet(block)
    hidden, skip = (torch.randn(2, c, 6, 5).contiguous(memory_format=torch.channels_last) for c in (16, 8))
    temb = torch.randn(2, 16)
    compiled = torch.compile(wrapper, fullgraph=True)
    with torch.no_grad():
        out = compiled(hidden, skip, temb)
        expected = block(torch.cat([hidden, skip], dim=1), temb)
    assert torch.allclose(out, expected, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_the_option_needs_compiled_resnets():
    with pytest.raises(ParameterError, match="concat_in_resnets .* add compile,compile_resnets"):
        check_optimizations(parse_optimizations("concat_in_resnets"), "fp32", "cpu")
    check_optimizations(parse_optimizations("compile,compile_resnets,concat_in_resnets"), "fp32", "cpu")


def test_up_blocks_with_freeu_are_left_alone_and_freeu_enabled_later_is_refused():
    pipe = build_random_pipeline("tiny", "fp32", "cpu")
    pipe.unet.enable_freeu(s1=0.9, s2=0.2, b1=1.3, b2=1.4)
    assert S.concat_in_resnets(pipe.unet) == 0
    pipe.unet.disable_freeu()
    assert S.concat_in_resnets(pipe.unet) > 0
    pipe.unet.enable_freeu(s1=0.9, s2=0.2, b1=1.3, b2=1.4)
    with pytest.raises(ParameterError, match="FreeU was enabled"):
        tiny_unet_call(pipe.unet, dtype=torch.float32)()


@pytest.mark.skipif(not torch.cuda.is_available() or not fused.available(),
                    reason="the GroupNorm kernels need a GPU (run on the H200: BENCHMARKS.md)")
def test_compiled_with_the_group_norm_kernels_it_agrees_on_the_gpu():
    """The way the fastest configuration runs it: the concatenation inside each compiled GroupNormResnetBlock's
    region, whose norms are Triton kernels that take the concatenated tensor from inductor."""
    pipe = build_random_pipeline("tiny", "bf16", "cuda")
    forward = tiny_unet_call(pipe.unet, device="cuda")
    apply_optimizations(pipe, parse_optimizations("channels_last"))
    before = forward()
    info = apply_optimizations(pipe, parse_optimizations(
        "compile,compile_resnets,fused_group_norms,nhwc_transformer_outputs,concat_in_resnets"))
    assert info["concat_in_resnets"] > 0 and info["fused_group_norms"]["resnets"] > 0
    assert all(type(r.resnet).__name__ == "GroupNormResnetBlock" for r in up_block_resnets(pipe.unet))
    assert relative_error(forward(), before) < 2e-2
