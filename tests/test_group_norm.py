"""The GroupNorm kernels (option fused_group_norms): the modules that use them on the CPU, the kernels in Triton's
CPU interpreter, and on a GPU."""
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from sccsdxl import fused
from sccsdxl import group_norm as G
from sccsdxl.errors import ParameterError
from sccsdxl.pipeline import build_random_pipeline
from sccsdxl.quant import check_optimizations, parse_optimizations

from conftest import assert_interpreted_ok, relative_error, resnet_block, tiny_unet_call, tiny_vae_decode


def block_inputs(block, device: str = "cpu", dtype=torch.float32, size: int = 8):
    torch.manual_seed(1)
    x = (torch.randn(2, block.norm1.num_channels, size, size, device=device) * 2 + 1).to(dtype)
    return x.contiguous(memory_format=torch.channels_last), torch.randn(2, 48, device=device, dtype=dtype)


def test_reference_is_the_shift_then_group_norm_then_silu():
    norm = torch.nn.GroupNorm(4, 16)
    x, shift = torch.randn(2, 16, 3, 5), torch.randn(2, 16)
    expected = F.silu(norm(x + shift[:, :, None, None]))
    assert torch.allclose(G.group_norm(x, norm, shift, silu=True), expected, atol=1e-6)
    assert torch.allclose(G.group_norm(x, norm), norm(x), atol=1e-6)


def test_swapped_resnet_block_computes_what_diffusers_block_computes():
    block = resnet_block()
    x, temb = block_inputs(block)
    with torch.no_grad():
        expected = block(x, temb)
        swapped = G.GroupNormResnetBlock(block)
        assert torch.allclose(swapped(x, temb), expected, rtol=1e-5, atol=1e-5)
        same_width = resnet_block(64, 64)  # no shortcut convolution
        assert torch.allclose(G.GroupNormResnetBlock(same_width)(x, temb), same_width(x, temb), rtol=1e-5, atol=1e-5)


def test_every_group_norm_of_the_unet_is_swapped_and_the_unet_still_agrees():
    pipe = build_random_pipeline("tiny", "fp32", "cpu")
    unet = pipe.unet.to(memory_format=torch.channels_last)
    resnets = sum(type(m).__name__ == "ResnetBlock2D" for m in unet.modules())
    transformers = sum(type(m).__name__ == "Transformer2DModel" for m in unet.modules())
    call = tiny_unet_call(unet, dtype=torch.float32)
    before = call()
    counts = G.fuse_group_norms(unet)
    assert counts == {"resnets": resnets, "transformer_norms": transformers, "output_norm": 1}
    assert resnets > 0 and transformers > 0
    assert not any(type(m).__name__ == "ResnetBlock2D" for m in unet.modules())
    assert isinstance(unet.conv_act, torch.nn.Identity)  # its SiLU runs in the output norm's kernel
    assert relative_error(call(), before) < 1e-5


def test_every_group_norm_of_the_vae_decoder_is_swapped_and_it_still_decodes_the_same():
    """Option vae_group_norms: the decoder's ResNet blocks (mid and up) and its output norm take the kernels' modules;
    the mid block's attention norm stays diffusers'."""
    pipe = build_random_pipeline("tiny", "fp32", "cpu")
    decoder = pipe.vae.decoder
    resnets = sum(type(m).__name__ == "ResnetBlock2D" for m in decoder.modules())
    decode = tiny_vae_decode(pipe)
    with torch.no_grad():
        before = decode()
        decoder.to(memory_format=torch.channels_last)
        counts = G.fuse_group_norms(decoder)
        after = decode()
    assert counts == {"resnets": resnets, "transformer_norms": 0, "output_norm": 1} and resnets > 0
    assert isinstance(decoder.conv_act, torch.nn.Identity)
    assert relative_error(after, before) < 1e-5


def test_blocks_unlike_sdxls_are_left_as_they_are():
    from diffusers.models.resnet import ResnetBlock2D

    assert G.can_fuse_resnet(resnet_block())
    for changed in (dict(up=True), dict(down=True), dict(time_embedding_norm="scale_shift"), dict(dropout=0.1),
                    dict(non_linearity="mish")):
        block = ResnetBlock2D(in_channels=64, out_channels=64, temb_channels=48, groups=32, **changed)
        assert not G.can_fuse_resnet(block), changed


def test_swapped_block_traces_as_one_graph():
    """compile_resnets compiles each GroupNormResnetBlock: dynamo must take it whole (here the CPU path)."""
    block = G.GroupNormResnetBlock(resnet_block())
    x, temb = block_inputs(block)
    compiled = torch.compile(copy.deepcopy(block), backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(x, temb), block(x, temb), rtol=1e-5, atol=1e-5)


def test_the_option_needs_channels_last_and_a_gpu_and_says_so():
    with pytest.raises(ParameterError, match="add channels_last"):
        check_optimizations(parse_optimizations("fused_group_norms"), "bf16", "cuda")
    if not fused.available():
        for options in ("channels_last,fused_group_norms", "vae_group_norms"):
            name = options.split(",")[-1]
            with pytest.raises(ParameterError, match=f"{name} is a Triton kernel: it needs an NVIDIA"):
                check_optimizations(parse_optimizations(options), "bf16", "cpu")


INTERPRETED = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    from sccsdxl import group_norm as G

    # the interpreter rounds fp32 -> bf16 toward zero (the GPU to nearest): each result to two bf16 steps
    step = 2 ** -7
    torch.manual_seed(0)
    cases = ((2, 40, 5, 7, 4), (3, 64, 4, 4, 32), (1, 130, 9, 3, 2))  # masked channels, 2 per group, 2 groups
    # (pixels per statistics slice, the two kernels' (pixels, channels) blocks): one pixel per slice, one slice
    # per image (several loop steps, the last one partial), uneven slices (the last one shorter)
    plans = ((1, (8, 64), (8, 64)), (None, (32, 128), (16, 64)), (8, (8, 64), (32, 128)))
    for per_slice, stat, normalize in plans:
        def slices(n_images, n_pixels, n_channels, per_slice=per_slice):
            size = min(per_slice or n_pixels, n_pixels)
            return size, -(-n_pixels // size)
        G._slices = slices
        for n, c, h, w, groups in cases:
            norm = torch.nn.GroupNorm(groups, c).to(torch.bfloat16)
            with torch.no_grad():
                norm.weight.copy_(torch.rand(c) + 0.5)
                norm.bias.copy_(torch.randn(c) * 0.1)
            x = (torch.randn(n, c, h, w) * 3 + 5).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
            shift = torch.randn(n, c).to(torch.bfloat16)
            for with_shift, silu in ((False, False), (True, True)):
                expected = F.group_norm(x.float() + (shift.float()[:, :, None, None] if with_shift else 0), groups,
                                        norm.weight.float(), norm.bias.float(), norm.eps)
                expected = F.silu(expected) if silu else expected
                out = torch.full_like(x, float("nan"))
                G.run_group_norm_config(x, norm, shift if with_shift else None, silu, out, stat, normalize)
                bound = expected.abs() * 2 * step + 2 * step * 2 ** -2
                where = (per_slice, n, c, h, w, groups, with_shift, silu)
                assert ((out.float() - expected).abs() <= bound).all(), where
    # fp32 far from zero, an outlier as a slice's first pixel: sums of squares taken about zero would cancel here
    x = (torch.randn(2, 64, 16, 16) + 1000).contiguous(memory_format=torch.channels_last)
    x[0, 3, 0, 0] += 40
    norm = torch.nn.GroupNorm(32, 64)
    out = torch.empty_like(x)
    G.run_group_norm_config(x, norm, None, False, out, (32, 64), (32, 64))
    expected = F.group_norm(x.double(), 32, norm.weight.double(), norm.bias.double(), norm.eps)
    assert float((out.double() - expected).abs().max()) < 1e-3
    print("kernel ok")
""")


@pytest.mark.skipif(fused.triton is None, reason="needs the triton package")
def test_statistics_slices_fill_the_gpu_and_cover_every_pixel_once():
    sms = torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 132
    for n_images, n_pixels, n_channels in ((50, 16384, 320), (2, 1024, 2560), (1, 27, 130), (64, 1, 4)):
        per_slice, n_slices = G._slices(n_images, n_pixels, n_channels)
        assert (n_slices - 1) * per_slice < n_pixels <= n_slices * per_slice  # no empty slice, none left out
        programs = n_images * n_slices * -(-n_channels // G.STAT_CHANNELS)
        assert programs >= min(n_images * n_pixels, G.SLICES_PER_SM * sms)  # the GPU filled, where pixels allow


@pytest.mark.skipif(fused.triton is None, reason="needs the triton package")
def test_the_tuning_choices_run_every_tile_of_each_kernel():
    plans = G.each_tuning_choice()
    assert {stat for stat, _ in plans} == set(G.STATISTICS_CHOICES)
    assert {stat[:3] for stat in G.STATISTICS_CHOICES} == set(G.STATISTICS_BLOCKS)
    assert {stat[3] for stat in G.STATISTICS_CHOICES} == {1, 3}  # each tile unpipelined and pipelined
    assert {normalize for _, normalize in plans} == set(G.NORMALIZE_BLOCKS)


@pytest.mark.skipif(fused.triton is None or fused.available(),
                    reason="needs the triton package; on a GPU the tests below run the compiled kernels themselves")
@pytest.mark.parametrize("fast_silu", ["0", "1"])
def test_kernels_in_tritons_cpu_interpreter_normalize_each_group(fast_silu):
    """The three kernels, run by Triton's interpreter on the CPU: slices, group merges, masks and the shift; SiLU
    with the compiler's sigmoid and with SCCSDXL_FAST_SILU's (there its reciprocal and exp2 the interpreter's own)."""
    assert_interpreted_ok(f"import os\nos.environ['SCCSDXL_FAST_SILU'] = '{fast_silu}'\n" + INTERPRETED, timeout=600)


gpu = pytest.mark.skipif(not fused.available(), reason="the Triton kernels need a GPU (run on the H200: BENCHMARKS.md)")


@gpu
@pytest.mark.parametrize("channels, size", [(320, 64), (1920, 32), (1000, 16)])  # SDXL's widths, and a ragged one
def test_kernels_match_the_reference(channels, size):
    norm = torch.nn.GroupNorm(32 if channels % 32 == 0 else 8, channels).to("cuda", torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(channels) + 0.5)
        norm.bias.copy_(torch.randn(channels) * 0.1)
    x = (torch.randn(4, channels, size, size, device="cuda") * 3 + 2).to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    shift = torch.randn(4, channels, device="cuda", dtype=torch.bfloat16)
    norm_fp32 = copy.deepcopy(norm).float()
    for with_shift in (False, True):
        for silu in (False, True):
            # the truth in fp32: the kernels round once (to bf16 at the end), the unfused bf16 ops up to three times
            expected = G.group_norm_reference(x.float(), norm_fp32, shift.float() if with_shift else None, silu)
            got = G.group_norm(x, norm, shift if with_shift else None, silu)
            assert got.is_contiguous(memory_format=torch.channels_last)
            assert relative_error(got, expected) < 4e-3, (with_shift, silu)
            for stat, normalize in G.each_tuning_choice():  # every configuration the tuning may pick, of each kernel
                out = torch.empty_like(x)
                G.run_group_norm_config(x, norm, shift if with_shift else None, silu, out, stat, normalize)
                assert relative_error(out, expected) < 4e-3, (with_shift, silu, stat, normalize)


@gpu
def test_kernels_keep_their_accuracy_where_the_mean_is_far_from_zero():
    """The normalizing pass computes x * scale + offset, whose two terms cancel where the mean is large against the
    spread: at a mean 40 standard deviations out the result still matches the fp32 truth to bf16's rounding."""
    norm = torch.nn.GroupNorm(32, 320).to("cuda", torch.bfloat16)
    x = (torch.randn(4, 320, 32, 32, device="cuda") + 40).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    shift = torch.randn(4, 320, device="cuda", dtype=torch.bfloat16)
    expected = G.group_norm_reference(x.float(), copy.deepcopy(norm).float(), shift.float(), silu=True)
    assert relative_error(G.group_norm(x, norm, shift, silu=True), expected) < 4e-3


@gpu
def test_the_normalizing_kernel_writes_e4m3_divided_by_the_given_scale():
    """What benchmarks/resnet_fp8_h200.py feeds its fp8 convolution (on the GPU only: Triton 3.8's interpreter
    converts to e4m3 wrongly where rounding carries into the exponent)."""
    norm = torch.nn.GroupNorm(32, 640).to("cuda", torch.bfloat16)
    x = (torch.randn(4, 640, 32, 32, device="cuda") * 3 + 2).to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    shift = torch.randn(4, 640, device="cuda", dtype=torch.bfloat16)
    expected = G.group_norm_reference(x.float(), copy.deepcopy(norm).float(), shift.float(), silu=True)
    scale = (expected.abs().amax() / 448).reshape(1)
    out = torch.empty_like(x, dtype=torch.float8_e4m3fn)
    G.run_group_norm_config(x, norm, shift, True, out, G.STATISTICS_BLOCKS[0], G.NORMALIZE_BLOCKS[0], scale)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(out.float() * scale, expected) < 0.04  # e4m3 keeps 3 mantissa bits: about 2.5 %
    assert relative_error((expected / scale).to(torch.float8_e4m3fn).float() * scale, expected) < 0.04


@gpu
def test_compiled_swapped_resnet_block_matches_diffusers_block():
    block = resnet_block(640, 1280, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    x, temb = block_inputs(block, "cuda", torch.bfloat16, size=32)
    swapped = torch.compile(G.GroupNormResnetBlock(block), fullgraph=True)
    with torch.no_grad():
        assert relative_error(swapped(x, temb), block(x, temb)) < 1e-2


@gpu
def test_unet_with_fused_group_norms_agrees_on_the_gpu():
    pipe = build_random_pipeline("tiny", "bf16", "cuda")
    unet = pipe.unet.to(memory_format=torch.channels_last)
    call = tiny_unet_call(unet, device="cuda")
    before = call()
    G.fuse_group_norms(unet)
    assert relative_error(call(), before) < 2e-2


@gpu
def test_compiled_vae_decoder_with_the_kernels_agrees_on_the_gpu():
    """What apply_optimizations builds for compile_vae,vae_no_upcast,vae_group_norms, against the decoder as it was."""
    from sccsdxl.quant import apply_optimizations

    pipe = build_random_pipeline("tiny", "bf16", "cuda")
    decode = tiny_vae_decode(pipe, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        before = decode()
        info = apply_optimizations(pipe, parse_optimizations("compile_vae,vae_no_upcast,vae_group_norms"))
        after = decode()
    assert info["vae_group_norms"]["resnets"] > 0 and info["compiled_vae_regions"] > 0
    assert pipe.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(after, before) < 2e-2


WARM_CACHE_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from torch._dynamo.utils import counters
    from diffusers.models.resnet import ResnetBlock2D
    from sccsdxl import group_norm
    from sccsdxl.quant import use_compile_cache

    use_compile_cache(sys.argv[1])
    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=640, out_channels=1280, temb_channels=1280, groups=32).eval()
    block = group_norm.GroupNormResnetBlock(block.to("cuda", torch.bfloat16).to(memory_format=torch.channels_last))
    x = torch.randn(2, 640, 32, 32, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    temb = torch.randn(2, 1280, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        out = torch.compile(block, fullgraph=True)(x, temb)
    hits = counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]
    print(json.dumps({"sum": float(out.float().sum()), "cache_hits": hits}))
""")


@gpu
def test_compiled_resnet_block_starts_warm_from_the_disk_cache_in_a_new_process(cache_in_two_processes):
    """What 04's warm start does: a second process loads the compiled graph holding the kernels from the cache."""
    runs = cache_in_two_processes(WARM_CACHE_SCRIPT)
    assert runs[1]["cache_hits"] > 0
    assert runs[1]["sum"] == pytest.approx(runs[0]["sum"], rel=1e-3)


def _ptxas_ships_with_triton() -> bool:
    if fused.triton is None:
        return False
    from triton.backends.nvidia.compiler import get_ptxas
    return os.path.exists(get_ptxas(90).path)


@pytest.mark.skipif(not _ptxas_ships_with_triton(), reason="needs the triton package with its ptxas (it compiles "
                                                            "for sm_90 without a GPU)")
def test_the_statistics_loop_compiles_for_hopper_without_a_barrier_per_step():
    """The statistics kernel ran at 0.6-1.2 TB/s on the H200, where a channel sum reads 2.7-3.6, while its loop
    reduced across threads at every step (BENCHMARKS.md, session 10); compiled here for sm_90, the loop must hold no
    barrier."""
    script = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "group_norm_ptx.py")
    done = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=300,
                          cwd=os.path.join(os.path.dirname(__file__), os.pardir))
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in done.stdout.splitlines()
            if line.startswith("| this tree")]
    assert len(rows) == 4
    for _, tile, barriers, shared, loads, _, ptxas in rows:
        assert (barriers, shared) == ("0", "0") and int(loads) > 0, tile
        assert ptxas.endswith(" 0 B spilled"), f"{tile}: {ptxas}"
