"""sccsdxl.fp8_conv (option fp8_convs) and the framed e4m3 output of sccsdxl.group_norm it reads."""
import os
import textwrap

import pytest
import torch
from conftest import assert_interpreted_ok, relative_error, resnet_block

from sccsdxl import fp8_conv
from sccsdxl import group_norm as G
from sccsdxl.fused import triton

pytest.importorskip("diffusers.models.resnet")


def test_the_framed_grid_puts_each_pixel_behind_a_zero_frame_and_guard_rows():
    assert G.frame_rows(2, 3, 4) == 2 * 7 + 2 * 5 * 6  # guard rows (width + 3) twice, two 5 x 6 framed images
    framed = torch.zeros(G.frame_rows(2, 3, 4), 1)
    G.framed_interior(framed, 2, 3, 4).copy_(torch.arange(1, 25.0).reshape(2, 3, 4, 1))
    grid = framed[7:-7].reshape(2, 5, 6)
    assert grid[:, 1:4, 1:5].flatten().tolist() == list(range(1, 25))  # each image's pixels in order
    assert grid[:, 0].abs().sum() == grid[:, 4].abs().sum() == grid[:, :, 0].abs().sum() == 0  # the frame
    assert framed[:7].abs().sum() == framed[-7:].abs().sum() == 0  # the guard rows


def test_zero_frame_zeroes_all_but_the_image_pixels():
    framed = torch.ones(G.frame_rows(2, 3, 4), 5)
    G.zero_frame(framed, 2, 3, 4)
    expected = torch.zeros_like(framed)
    G.framed_interior(expected, 2, 3, 4).fill_(1)
    assert torch.equal(framed, expected)


def test_framed_e4m3_reference_scales_the_batch_by_its_largest_value():
    norm = resnet_block(64, 64, temb=32).norm1
    x = torch.randn(3, 64, 5, 5) * torch.tensor([1.0, 10.0, 0.1])[:, None, None, None]  # normalized: alike
    framed, amax = G.group_norm_framed_fp8(x, norm)
    exact = G.group_norm_reference(x, norm, silu=True)
    assert amax.shape == (1,) and torch.allclose(amax, exact.abs().amax())
    inside = G.framed_interior(framed, 3, 5, 5).float()
    assert inside.abs().amax() == G.FP8_MAX  # the largest value is e4m3's largest
    restored = inside * G.e4m3_scale(amax)
    assert relative_error(restored, exact.permute(0, 2, 3, 1)) < 0.04  # e4m3: 3 bits of mantissa


@pytest.mark.parametrize("c_in,c_out", [(64, 64), (96, 64)])  # with a 1x1 shortcut when the widths differ
def test_block_computes_the_resnet_block_within_the_fp8_error(c_in, c_out):
    """On the CPU (the reference path): the block's output against diffusers' ResnetBlock2D in fp32."""
    block = resnet_block(c_in, c_out, temb=32)
    x, temb = torch.randn(2, c_in, 6, 6), torch.randn(2, 32)
    fp8_block = fp8_conv.Fp8ConvResnetBlock(G.GroupNormResnetBlock(block))
    with torch.no_grad():
        expected = block(x, temb)
        got = fp8_block(x, temb)
        plain = G.GroupNormResnetBlock(block)(x, temb)
    assert torch.allclose(plain, expected, atol=1e-5)  # the block it wraps computes diffusers' block
    # the residual carries the input unquantized; the two convolutions' share carries e4m3's error
    assert relative_error(got - x if c_in == c_out else got, expected - x if c_in == c_out else expected) < 0.06


def test_the_residual_in_the_convolution_computes_what_the_add_after_it_does(monkeypatch):
    """By default the block adds its shortcut (and the shortcut convolution's bias) in the second convolution's
    epilogue; with SCCSDXL_CONV_RESIDUAL_IN_CONV=0, after it, as session 18 measured: the same sums."""
    block = resnet_block(96, 64, temb=32)
    x, temb = torch.randn(2, 96, 6, 6), torch.randn(2, 32)
    fused = fp8_conv.Fp8ConvResnetBlock(G.GroupNormResnetBlock(block))
    monkeypatch.setattr(fp8_conv, "RESIDUAL_IN_CONV", False)
    apart = fp8_conv.Fp8ConvResnetBlock(G.GroupNormResnetBlock(block))
    assert fused.residual_in_conv and not apart.residual_in_conv
    assert torch.allclose(fused.fp8_conv2.bias, block.conv2.bias + block.conv_shortcut.bias)
    with torch.no_grad():
        assert relative_error(fused(x, temb), apart(x, temb)) < 1e-5


def test_weights_are_e4m3_per_output_channel_in_tap_order():
    conv = torch.nn.Conv2d(64, 40, 3, padding=1)
    fp8 = fp8_conv.Fp8Conv3x3(conv)
    assert fp8.weight.dtype == torch.float8_e4m3fn and fp8.weight.shape == (40, 9 * 64)
    restored = (fp8.weight.float() * fp8.scale[:, None]).reshape(40, 3, 3, 64).permute(0, 3, 1, 2)
    assert relative_error(restored, conv.weight) < 0.04
    assert fp8.weight.float().abs().amax(dim=1).eq(G.FP8_MAX).all()  # each output channel uses the whole range
    assert fp8_conv.Fp8Conv3x3(conv, with_bias=False).bias is None


def test_upsample_computes_the_upsampler_within_the_fp8_error():
    """On the CPU (the reference path): the upsample and convolution of diffusers' Upsample2D, each output phase
    from the folded 2x2 kernels in e4m3; another output size takes the original path."""
    from diffusers.models.upsampling import Upsample2D

    from sccsdxl.upsample import FoldedUpsample

    torch.manual_seed(1)
    upsample = Upsample2D(64, use_conv=True, out_channels=32).eval()
    x = torch.randn(2, 64, 6, 5)
    fp8 = fp8_conv.Fp8Upsample(FoldedUpsample(upsample))
    assert fp8.weight.dtype == torch.float8_e4m3fn and fp8.weight.shape == (4 * 32, 4 * 64)
    with torch.no_grad():
        assert relative_error(fp8(x), upsample(x)) < 0.06
        assert torch.equal(fp8(x, output_size=(13, 11)), upsample(x, output_size=(13, 11)))
    assert fp8_conv.can_run_upsample(FoldedUpsample(upsample))
    assert not fp8_conv.can_run_upsample(FoldedUpsample(Upsample2D(40, use_conv=True)))  # no step divides 40


def test_only_blocks_whose_convolutions_it_can_run_are_swapped():
    unet = torch.nn.Module()
    unet.ok = G.GroupNormResnetBlock(resnet_block(64, 64, temb=32))
    unet.narrow = G.GroupNormResnetBlock(resnet_block(40, 40, temb=32, groups=8))  # no channel step divides 40
    unet.plain = resnet_block(64, 64, temb=32)  # not fused_group_norms' block: left alone
    assert fp8_conv.fp8_resnet_convs(unet) == 1
    assert type(unet.ok) is fp8_conv.Fp8ConvResnetBlock and type(unet.narrow) is G.GroupNormResnetBlock
    assert not fp8_conv.can_run(torch.nn.Conv2d(64, 64, 3, stride=2, padding=1))
    assert not fp8_conv.can_run(torch.nn.Conv2d(64, 64, 1))


INTERPRETED = textwrap.dedent("""
    import torch
    from sccsdxl import fp8_conv, group_norm as G

    torch.manual_seed(4)
    # the frame-zeroing kernel against the torch form: non-square images, rows wider than its 128-byte steps
    framed, expected = (torch.full((G.frame_rows(2, 3, 4), 200), float("nan")).to(G.FP8) for _ in range(2))
    amax = torch.full((1,), float("nan"))
    G.zero_frame_and_amax(framed, amax, 2, 3, 4)
    G.zero_frame(expected, 2, 3, 4)
    assert torch.equal(framed.view(torch.uint8), expected.view(torch.uint8)) and float(amax) == 0
    # a shift and whole tiles; no shift, 3 images of 5 x 5 and partial row and channel tiles; an affine that puts
    # every value near SiLU's minimum (-0.2785 at -1.2785), where the largest |SiLU| lies inside the values' range
    for n, c, size, with_shift, near_minimum in ((2, 64, 6, True, False), (3, 96, 5, False, False),
                                                 (2, 64, 6, False, True)):
        norm = torch.nn.GroupNorm(32, c).to(torch.bfloat16)
        with torch.no_grad():
            norm.weight.copy_(torch.full((c,), 0.3) if near_minimum else torch.rand(c) + 0.5)
            norm.bias.copy_(torch.full((c,), -1.2785) if near_minimum else torch.randn(c) * 0.1)
        x = (torch.randn(n, c, size, size) * 2 + 1).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        shift = torch.randn(n, c).to(torch.bfloat16) if with_shift else None
        framed = torch.full((G.frame_rows(n, size, size), c), float("nan")).to(G.FP8)  # NaN where nothing is written
        amax = torch.full((1,), float("nan"))
        G.zero_frame_and_amax(framed, amax, n, size, size)
        assert float(amax) == 0 and G.framed_interior(framed, n, size, size).float().isnan().all(), where
        G.run_framed_config(x, norm, shift, framed, amax, (8, 64), (8, 32))
        exact = G.group_norm_reference(x, norm, shift, silu=True).float()
        where = (n, c, size, with_shift, near_minimum)
        # the interpreter rounds the norm to bf16 toward zero (the GPU to nearest) before SiLU
        assert abs(float(amax) - float(exact.abs().amax())) <= 0.02 * float(amax), where
        border = framed.float().clone()
        G.framed_interior(border, n, size, size).zero_()
        assert border.abs().max() == 0, where  # nothing written outside the image pixels
        inside = G.framed_interior(framed, n, size, size).float()
        assert not inside.isnan().any(), where  # every image pixel written
        # Triton 3.8's interpreter converts fp32 to e4m3 wrongly where rounding carries into the exponent (the GPU's
        # cvt rounds right), which about doubles e4m3's error here
        restored = inside * G.e4m3_scale(amax)
        assert float((restored - exact.permute(0, 2, 3, 1)).norm() / exact.norm()) < 0.1, where
        # the convolution kernel on those rows, against the same sums of the dequantized operands
        conv = torch.nn.Conv2d(c, 40, 3, padding=1).to(torch.bfloat16)
        residual = torch.randn(n, size, size, 40).to(torch.bfloat16)  # a ResNet block's shortcut, NHWC
        for with_bias, with_residual in ((True, False), (False, False), (True, True)):
            fp8 = fp8_conv.Fp8Conv3x3(conv, with_bias=with_bias)
            y = torch.full((n, size, size, 40), float("nan"), dtype=torch.bfloat16)
            fp8_conv.run_conv_config(framed, amax, fp8, y, (16, 16, 32), residual if with_residual else None, 0.5)
            expected = fp8.reference(framed, amax, n, size, size).float()
            if with_residual:
                expected = (expected + residual.permute(0, 3, 1, 2).float()) * 0.5
            got = y.permute(0, 3, 1, 2).float()
            assert not got.isnan().any(), where  # every pixel and channel written
            assert float((got - expected).norm() / expected.norm()) < 0.01, (where, with_bias, with_residual)
            # persistent: two programs walking every tile in turn
            y = torch.full((n, size, size, 40), float("nan"), dtype=torch.bfloat16)
            fp8_conv.run_conv_config(framed, amax, fp8, y, (16, 16, 32), residual if with_residual else None, 0.5,
                                     persistent=True)
            assert torch.equal(y.permute(0, 3, 1, 2).float(), got), (where, "persistent")
            if with_residual:  # a tile above 128 x 128 outputs: the residual's epilogue in two halves of its columns
                y = torch.full((n, size, size, 40), float("nan"), dtype=torch.bfloat16)
                fp8_conv.run_conv_config(framed, amax, fp8, y, (256, 128, 32), residual, 0.5)
                halves = y.permute(0, 3, 1, 2).float()
                error = float((halves - expected).norm() / expected.norm())
                assert not halves.isnan().any() and error < 0.01, (where, "halves")
    # a folded upsampler: the plain framing kernel, then the kernel's four phases written interleaved; 3 images of
    # 5 x 5 (partial tiles), 24 channels per phase (96 outputs: partial channel tiles)
    from diffusers.models.upsampling import Upsample2D
    from sccsdxl.upsample import FoldedUpsample

    n, c, size = 3, 64, 5
    x = (torch.randn(n, c, size, size) * 3).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    framed = torch.full((G.frame_rows(n, size, size), c), float("nan")).to(G.FP8)
    G.zero_frame(framed, n, size, size)
    amax = x.float().abs().amax().reshape(1)
    G.run_frame_config(x, framed, amax, (8, 32))
    reference, _ = G.frame_e4m3_reference(x)
    assert not framed.float().isnan().any()  # every image pixel written, the frame zero
    assert float((framed.float() - reference.float()).norm() / reference.float().norm()) < 0.1
    up = fp8_conv.Fp8Upsample(FoldedUpsample(Upsample2D(c, use_conv=True, out_channels=24).to(torch.bfloat16)))
    y = torch.full((n, 2 * size, 2 * size, 24), float("nan"), dtype=torch.bfloat16)
    fp8_conv.run_conv_config(framed, amax, up, y, (16, 32, 32))
    expected = up.reference(framed, amax, n, size, size).float()
    got = y.permute(0, 3, 1, 2).float()
    assert not got.isnan().any()  # every pixel of every phase written
    assert float((got - expected).norm() / expected.norm()) < 0.01
    y = torch.full((n, 2 * size, 2 * size, 24), float("nan"), dtype=torch.bfloat16)
    fp8_conv.run_conv_config(framed, amax, up, y, (128, 256, 32))  # the epilogue in halves, the second one masked
    halves = y.permute(0, 3, 1, 2).float()
    assert not halves.isnan().any() and float((halves - expected).norm() / expected.norm()) < 0.01
    print("kernel ok")
""")


@pytest.mark.skipif(triton is None or torch.cuda.is_available(),
                    reason="needs the triton package; on a GPU the tests below run the compiled kernels")
def test_kernels_in_tritons_cpu_interpreter_write_the_frame_and_sum_the_shifted_rows():
    assert_interpreted_ok(INTERPRETED)


gpu = pytest.mark.skipif(not (torch.cuda.is_available() and triton is not None and torch.version.cuda
                              and torch.cuda.get_device_capability(0) >= (9, 0)),
                         reason="the kernels need an NVIDIA Hopper GPU or later (run on the H200: BENCHMARKS.md)")


@gpu
@pytest.mark.parametrize("residual_in_conv", [False, True])
@pytest.mark.parametrize("c_in,c_out,size", [(640, 640, 32), (1920, 640, 32), (320, 320, 64)])
def test_compiled_block_on_the_gpu_matches_its_reference(c_in, c_out, size, residual_in_conv, monkeypatch):
    monkeypatch.setattr(fp8_conv, "RESIDUAL_IN_CONV", residual_in_conv)
    block = resnet_block(c_in, c_out, temb=1280).to("cuda", torch.bfloat16).to(memory_format=torch.channels_last)
    fp8_block = fp8_conv.Fp8ConvResnetBlock(G.GroupNormResnetBlock(block))
    x = torch.randn(4, c_in, size, size, device="cuda", dtype=torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    temb = torch.randn(4, 1280, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        expected = block(x, temb).float()
        eager = fp8_block(x, temb)
        compiled = torch.compile(fp8_block, fullgraph=True)(x, temb)
        framed, amax = G.group_norm_framed_fp8(x, block.norm1)
        ref_framed, ref_amax = G.group_norm_framed_fp8_reference(x, block.norm1)
    assert torch.allclose(amax, ref_amax, rtol=1e-2)
    assert relative_error(G.framed_interior(framed, 4, size, size), G.framed_interior(ref_framed, 4, size, size)) < 0.02
    subtract = x.float() if c_in == c_out else 0
    assert relative_error(eager.float() - subtract, expected - subtract) < 0.06
    assert relative_error(compiled, eager) < 0.01


@gpu
def test_compiled_vae_decoder_with_fp8_convolutions_decodes_within_the_fp8_error():
    """What apply_optimizations builds for compile_vae,vae_no_upcast,vae_group_norms,vae_fp8_convs on the GPU,
    against the decoder as it was."""
    from conftest import tiny_vae_decode

    from sccsdxl.pipeline import build_random_pipeline
    from sccsdxl.quant import apply_optimizations, parse_optimizations

    pipe = build_random_pipeline("tiny", "bf16", "cuda")
    decode = tiny_vae_decode(pipe, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        before = decode()
        info = apply_optimizations(pipe, parse_optimizations("compile_vae,vae_no_upcast,vae_group_norms,"
                                                             "vae_fp8_convs"))
        after = decode()
    assert info["vae_fp8_convs"] > 0 and info["compiled_vae_regions"] > 0
    assert relative_error(after, before) < 0.12  # as on the CPU (test_quant): e4m3 through the swapped blocks


@gpu
@pytest.mark.parametrize("channels,size", [(1280, 32), (640, 64)])  # the UNet's two upsamplers' inputs
def test_compiled_upsample_on_the_gpu_matches_the_folded_one(channels, size):
    from diffusers.models.upsampling import Upsample2D

    from sccsdxl.upsample import FoldedUpsample

    torch.manual_seed(3)
    upsample = Upsample2D(channels, use_conv=True).to("cuda", torch.bfloat16).to(memory_format=torch.channels_last)
    folded = FoldedUpsample(upsample, transposed=True)
    fp8 = fp8_conv.Fp8Upsample(folded)
    x = torch.randn(4, channels, size, size, device="cuda", dtype=torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = folded(x)
        framed, amax = G.frame_e4m3(x)
        ref_framed, ref_amax = G.frame_e4m3_reference(x)
        eager = fp8(x)
        compiled = torch.compile(fp8, fullgraph=True)(x)
        reference = fp8.reference(framed, amax, 4, size, size)
    assert torch.equal(amax, ref_amax)
    assert relative_error(framed.float(), ref_framed.float()) < 0.01
    assert eager.shape == expected.shape and eager.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(eager, reference) < 0.01  # the kernel's sums: the reference's, up to the bf16 output
    assert relative_error(eager, expected) < 0.06  # e4m3's rounding
    assert relative_error(compiled, eager) < 0.01


def test_the_tuning_offers_only_channel_steps_that_divide_the_input_channels():
    if triton is None:
        pytest.skip("needs the triton package")

    def steps(**args) -> set[int]:
        return {c.kwargs["BK"] for c in fp8_conv.fits(fp8_conv.configs(), args)}
    assert steps(C_IN=320) == {32, 64} and steps(C_IN=960) == {32, 64}  # 128 divides neither
    assert steps(C_IN=640) == steps(C_IN=1280) == {32, 64, 128}
    residual = {"C_IN": 1280, "HAS_RESIDUAL": True}
    wide = [c for c in fp8_conv.fits(fp8_conv.configs(), residual, split_epilogues=False) if c.kwargs["BN"] > 128]
    assert wide == []  # the residual's epilogue spills with 256-wide output tiles, unless stored in halves
    assert [c for c in fp8_conv.fits(fp8_conv.configs(), residual, split_epilogues=True) if c.kwargs["BN"] > 128]


@gpu
@pytest.mark.parametrize("c_in,c_out", [(320, 320), (1280, 1280)])
def test_every_added_choice_computes_the_reference_sums_on_the_gpu(c_in, c_out):
    """The added choices (SCCSDXL_CONV_MORE_TILES, on unless =0), the persistent ones with more tiles than programs,
    so each program runs several."""
    torch.manual_seed(7)
    conv = torch.nn.Conv2d(c_in, c_out, 3, padding=1).to("cuda", torch.bfloat16)
    fp8 = fp8_conv.Fp8Conv3x3(conv)
    x = torch.randn(8, c_in, 32, 32, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        framed, amax = G.frame_e4m3(x)
        expected = fp8.reference(framed, amax, 8, 32, 32)
    def key(config) -> tuple:
        return tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages
    plain = {key(c) for c in fp8_conv.configs(more=False)}
    added = [c for c in fp8_conv.fits(fp8_conv.configs(more=True), {"C_IN": c_in, "C_OUT": c_out})
             if key(c) not in plain]
    assert any(c.kwargs["BM"] == 256 for c in added)
    assert any(c.kwargs["PERSISTENT"] for c in added) == (c_in % 128 == 0)  # the persistent tiles step 128 channels
    for config in added:
        kw = config.kwargs
        y = torch.full((8, 32, 32, c_out), float("nan"), device="cuda", dtype=torch.bfloat16)
        fp8_conv.run_conv_config(framed, amax, fp8, y, (kw["BM"], kw["BN"], kw["BK"]), persistent=kw["PERSISTENT"],
                                 num_warps=config.num_warps, num_stages=config.num_stages)
        assert relative_error(y.permute(0, 3, 1, 2), expected) < 0.01, kw


@gpu
def test_every_tile_with_its_epilogue_in_halves_computes_the_reference_on_the_gpu():
    """SCCSDXL_CONV_SPLIT_EPILOGUES's choices (on unless =0): the tiles above 128 x 128 outputs, persistent ones too,
    with a residual add (1,280 channels) and as a folded upsampler (640 channels, 2,560 phase outputs)."""
    from diffusers.models.upsampling import Upsample2D

    from sccsdxl.upsample import FoldedUpsample

    torch.manual_seed(8)
    conv = fp8_conv.Fp8Conv3x3(torch.nn.Conv2d(1280, 1280, 3, padding=1).to("cuda", torch.bfloat16))
    upsample = Upsample2D(640, use_conv=True).to("cuda", torch.bfloat16)
    up = fp8_conv.Fp8Upsample(FoldedUpsample(upsample))
    for module, c_in, size in ((conv, 1280, 32), (up, 640, 32)):
        folded = module is up
        x = torch.randn(8, c_in, size, size, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            framed, amax = G.frame_e4m3(x.contiguous(memory_format=torch.channels_last))
            expected = module.reference(framed, amax, 8, size, size).float()
        out_size, c_out = (2 * size, 640) if folded else (size, 1280)
        residual = None if folded else torch.randn(8, size, size, c_out, device="cuda", dtype=torch.bfloat16)
        if residual is not None:
            expected = (expected + residual.permute(0, 3, 1, 2).float()) * 0.5
        wide = [c for c in fp8_conv.fits(fp8_conv.configs(more=True), {"C_IN": c_in, "FOLDED": folded,
                                                                      "HAS_RESIDUAL": not folded},
                                         split_epilogues=True) if c.kwargs["BM"] * c.kwargs["BN"] > 128 * 128]
        assert len(wide) >= 5
        for config in wide:
            kw = config.kwargs
            y = torch.full((8, out_size, out_size, c_out), float("nan"), device="cuda", dtype=torch.bfloat16)
            fp8_conv.run_conv_config(framed, amax, module, y, (kw["BM"], kw["BN"], kw["BK"]), residual, 0.5,
                                     persistent=kw["PERSISTENT"], num_warps=config.num_warps,
                                     num_stages=config.num_stages)
            assert relative_error(y.permute(0, 3, 1, 2), expected) < 0.01, (folded, kw)


def test_the_added_choices_are_offered_unless_switched_off():
    if triton is None:
        pytest.skip("needs the triton package")
    plain, more = fp8_conv.configs(more=False), fp8_conv.configs(more=True)
    assert not any(c.kwargs["PERSISTENT"] for c in plain) and len(plain) == len(fp8_conv.TILES)
    assert len(more) == len(plain) + len(fp8_conv.WIDE_TILES) + len(fp8_conv.PERSISTENT_TILES)
    assert sum(c.kwargs["PERSISTENT"] for c in more) == len(fp8_conv.PERSISTENT_TILES)
    # the kernel's tuning takes them unless the environment says SCCSDXL_CONV_MORE_TILES=0
    switched_off = os.environ.get("SCCSDXL_CONV_MORE_TILES") == "0"
    assert len(fp8_conv._shifted_conv_kernel.configs) == len(plain if switched_off else more)
    # a residual add's or a folded upsampler's epilogue: no tile larger than 128 x 128, persistent or not, unless
    # stored in parts (SCCSDXL_CONV_SPLIT_EPILOGUES, on unless =0), which takes every choice
    split_off = os.environ.get("SCCSDXL_CONV_SPLIT_EPILOGUES") == "0"
    for narrow in ({"HAS_RESIDUAL": True}, {"FOLDED": True}):
        args = {"C_IN": 1280, "C_OUT": 1280, **narrow}
        kept = fp8_conv.fits(more, args, split_epilogues=False)
        assert kept and max(c.kwargs["BM"] * c.kwargs["BN"] for c in kept) == 128 * 128
        assert fp8_conv.fits(more, args, split_epilogues=True) == more
        assert fp8_conv.fits(more, args) == (kept if split_off else more)


@gpu
def test_a_second_process_takes_the_convolutions_kept_tuning(tuning_in_two_processes):
    """The kernel sets its TMA blocks in a heuristic, not a pre-hook, so Triton keeps its timings: a second process at
    the same shape loads them (no "autotuning" line from Triton) and runs the same tile."""
    first, second = tuning_in_two_processes(textwrap.dedent("""
        import torch
        from sccsdxl import fp8_conv, group_norm as G
        conv = fp8_conv.Fp8Conv3x3(torch.nn.Conv2d(64, 64, 3, padding=1).to("cuda", torch.bfloat16))
        x = torch.randn(2, 64, 8, 8, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        framed, amax = G.frame_e4m3(x)
        fp8_conv.shifted_conv(conv, framed, amax, 2, 8, 8, folded=False)
        print("chosen", fp8_conv._shifted_conv_kernel.best_config)
    """))
    assert "Triton autotuning for function _shifted_conv_kernel" in first
    assert "Triton autotuning" not in second
    assert first.split("chosen")[-1] == second.split("chosen")[-1]
