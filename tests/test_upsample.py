"""The 2x upsamplers folded into their convolutions (options folded_upsamplers and transposed_upsamplers): the same
result as diffusers'."""
import copy

import pytest
import torch
from diffusers.models.upsampling import Upsample2D

from sccsdxl import upsample as U
from sccsdxl.errors import ParameterError
from sccsdxl.pipeline import build_random_pipeline
from sccsdxl.quant import apply_optimizations, check_optimizations, parse_optimizations

from conftest import relative_error, tiny_unet_call, tiny_vae_decode


@pytest.mark.parametrize("channels, out_channels, height, width, bias", [
    (8, 8, 5, 7, True),  # odd, unequal sides
    (6, 10, 4, 4, False),  # more outputs than inputs, no bias
    (3, 3, 1, 1, True),  # one pixel: every tap but the centre's falls on the padding
])
@pytest.mark.parametrize("transposed", [False, True])
def test_the_folded_upsampler_computes_the_upsample_and_convolution(channels, out_channels, height, width, bias,
                                                                    transposed):
    torch.manual_seed(0)
    original = Upsample2D(channels, use_conv=True, out_channels=out_channels, bias=bias)
    x = torch.randn(2, channels, height, width)
    with torch.no_grad():
        assert torch.allclose(U.FoldedUpsample(original, transposed)(x), original(x), atol=1e-5)


@pytest.mark.parametrize("transposed", [False, True])
def test_each_phase_reads_the_taps_that_land_on_its_pixels(transposed):
    """One input pixel and a kernel with a distinct power of two per tap: each output pixel's sum of taps says
    which taps the folding gave it."""
    original = Upsample2D(1, use_conv=True, bias=False)
    with torch.no_grad():
        original.conv.weight.copy_(2.0 ** torch.arange(9.0).view(1, 1, 3, 3))
        out = U.FoldedUpsample(original, transposed)(torch.ones(1, 1, 1, 1))[0, 0]
    # even output rows read taps rows 1-2, odd rows taps rows 0-1 (the other tap row falls on the zero padding)
    taps = 2.0 ** torch.arange(9.0).view(3, 3)
    expected = torch.tensor([[taps[1:, 1:].sum(), taps[1:, :2].sum()], [taps[:2, 1:].sum(), taps[:2, :2].sum()]])
    assert torch.equal(out, expected)


@pytest.mark.parametrize("transposed", [False, True])
def test_channels_last_stays_channels_last(transposed):
    torch.manual_seed(0)
    original = Upsample2D(8, use_conv=True).to(memory_format=torch.channels_last)
    folded = U.FoldedUpsample(original, transposed)
    assert folded.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = folded(x)
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(out, original(x), atol=1e-5)


@pytest.mark.parametrize("transposed", [False, True])
def test_an_output_size_other_than_twice_goes_the_original_way(transposed):
    torch.manual_seed(0)
    original = Upsample2D(4, use_conv=True)
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        for size in ((11, 11), (10, 10)):
            assert torch.allclose(U.FoldedUpsample(original, transposed)(x, size), original(x, size), atol=1e-5)


def test_upsamplers_that_do_something_else_are_left_alone():
    assert U.can_fold(Upsample2D(4, use_conv=True))
    for other in (Upsample2D(4), Upsample2D(4, use_conv_transpose=True), Upsample2D(4, use_conv=True, kernel_size=1,
                  padding=0), Upsample2D(4, use_conv=True, norm_type="ln_norm", eps=1e-5, elementwise_affine=True),
                  Upsample2D(4, use_conv=True, interpolate=False), torch.nn.Conv2d(4, 4, 3, padding=1)):
        assert not U.can_fold(other), other


@pytest.mark.parametrize("option", ["folded_upsamplers", "transposed_upsamplers"])
def test_the_tiny_unet_and_decoder_give_the_same_with_the_option(option):
    pipe = build_random_pipeline("tiny", "fp32", "cpu")
    unet_forward, decode = tiny_unet_call(pipe.unet, dtype=torch.float32), tiny_vae_decode(pipe, images=2)
    upsamplers = [m for m in [*pipe.unet.modules(), *pipe.vae.decoder.modules()] if U.can_fold(m)]
    assert upsamplers
    with torch.no_grad():
        before = unet_forward(), decode()
        info = apply_optimizations(pipe, parse_optimizations(option))
        after = unet_forward(), decode()
    assert info[option] == len(upsamplers)
    assert all(m.transposed == (option == "transposed_upsamplers")
               for m in [*pipe.unet.modules(), *pipe.vae.decoder.modules()] if isinstance(m, U.FoldedUpsample))
    assert not any(U.can_fold(m) for m in [*pipe.unet.modules(), *pipe.vae.decoder.modules()])
    for a, b in zip(after, before):
        assert relative_error(a, b) < 1e-5


def test_the_two_forms_exclude_each_other():
    with pytest.raises(ParameterError, match="transposed_upsamplers takes the place of folded_upsamplers"):
        check_optimizations(parse_optimizations("folded_upsamplers,transposed_upsamplers"), "fp32", "cpu")


@pytest.mark.parametrize("transposed", [False, True])
def test_the_folded_upsampler_traces_as_one_graph(transposed):
    """compile_resnets and compile_vae compile each FoldedUpsample whole (here the CPU path)."""
    torch.manual_seed(0)
    folded = U.FoldedUpsample(Upsample2D(8, use_conv=True), transposed)
    compiled = torch.compile(copy.deepcopy(folded), backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 8, 4, 6)
    with torch.no_grad():
        assert torch.allclose(compiled(x), folded(x), atol=1e-6)


@pytest.mark.parametrize("channels_last", [True, False])
def test_the_interleave_is_right_compiled_by_inductor(channels_last):
    """The interleave is a strided view of the convolution's output: inductor must read it with the strides the
    convolution wrote (here on the CPU, whose inductor lowers the view as on a GPU)."""
    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    original = Upsample2D(16, use_conv=True).to(memory_format=memory_format)
    x = torch.randn(2, 16, 5, 7).contiguous(memory_format=memory_format)
    compiled = torch.compile(U.FoldedUpsample(original), fullgraph=True)
    with torch.no_grad():
        out = compiled(x)
        assert torch.allclose(out, original(x), atol=1e-5)
    assert out.is_contiguous(memory_format=memory_format)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run on the H200)")


@gpu
@pytest.mark.parametrize("transposed", [False, True])
def test_compiled_folded_upsampler_agrees_with_diffusers_in_bf16_on_the_gpu(transposed):
    """The UNet's 640-channel upsampler at 4 rows, channels_last bf16, compiled as compile_resnets does (one static
    graph per shape): as close to the fp32 result as diffusers' own bf16 upsampler, and channels_last out."""
    from sccsdxl.quant import static_graphs

    static_graphs()  # with automatic dynamic shapes the compiled output came back NCHW on the H200 (session 13)
    torch.manual_seed(0)
    original = Upsample2D(640, use_conv=True).cuda()
    x = torch.randn(4, 640, 64, 64, device="cuda")
    with torch.no_grad():
        reference = original(x)
        bf16 = original.to(torch.bfloat16).to(memory_format=torch.channels_last)
        folded = U.FoldedUpsample(copy.deepcopy(bf16), transposed)
        folded.compile(fullgraph=True)
        x = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        out = folded(x)
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert relative_error(out, reference) < 1.5 * relative_error(bf16(x), reference) + 1e-3
