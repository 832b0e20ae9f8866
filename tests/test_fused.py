"""The fp8 row-quantization kernels (options fused_geglu, fp8_attn_out, fused_norms): their definitions and modules on the CPU,
the kernels in Triton's CPU interpreter, and on a GPU."""
import copy
import os
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sccsdxl import fused
from sccsdxl.pipeline import build_random_pipeline

from conftest import assert_interpreted_ok, relative_error, tiny_unet_call


def feed_forward(dim: int = 64, dtype=torch.bfloat16):
    from diffusers.models.attention import FeedForward

    torch.manual_seed(0)
    return FeedForward(dim, activation_fn="geglu").to(dtype).eval()


def geglu(hidden: torch.Tensor) -> torch.Tensor:
    value, gate = hidden.float().chunk(2, dim=-1)
    return value * F.gelu(gate)


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


def sdxl_block(width: int = 64, heads: int = 4, text_width: int = 96, device: str = "cpu"):
    """A BasicTransformerBlock as SDXL builds it (LayerNorms, self- then cross-attention, GEGLU), q/k/v fused."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    torch.manual_seed(7)
    block = BasicTransformerBlock(width, heads, width // heads, cross_attention_dim=text_width, activation_fn="geglu",
                                  norm_type="layer_norm")
    with torch.no_grad():  # LayerNorms that are not the identity, so that their weights and biases count
        for norm in (block.norm1, block.norm2, block.norm3):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_(0, 0.1)
    for attention in (block.attn1, block.attn2):  # what the pipeline's fuse_qkv_projections does to each
        attention.fuse_projections()
        attention.set_processor(FusedAttnProcessor2_0())
    return block.to(device, torch.bfloat16).eval()


def unfused_fp8_block(block):
    """The same block with every linear that Fp8TransformerBlock runs in fp8 swapped one by one, each quantizing its
    own input: what quant_all_linears, fused_geglu and fp8_attn_out compute without the fused norms."""
    block = copy.deepcopy(block)
    for attention, name in ((block.attn1, "to_qkv"), (block.attn2, "to_q")):
        setattr(attention, name, fused.Fp8RowsLinear(getattr(attention, name)))
        attention.to_out[0] = fused.Fp8RowsLinear(attention.to_out[0])
    block.ff = fused.Fp8GegluFeedForward(block.ff)
    block.ff.proj = fused.Fp8RowsLinear(block.ff.proj)
    return block


def block_inputs(block, tokens: int = 16, device: str = "cpu"):
    torch.manual_seed(8)
    return (torch.randn(2, tokens, block.norm1.normalized_shape[0], device=device, dtype=torch.bfloat16),
            torch.randn(2, 77, block.attn2.to_kv.in_features, device=device, dtype=torch.bfloat16))


def test_layer_norm_rows_on_the_cpu_are_the_sum_then_layer_norm_then_torchaos_quantization():
    norm = sdxl_block().norm2
    x, residual = (torch.randn(5, 64, dtype=torch.bfloat16) for _ in range(2))
    total, values, scales = fused.add_layer_norm_fp8_rows(x, residual, norm)
    assert torch.equal(total, x + residual)
    with torch.no_grad():
        ref_values, ref_scales = fused.quantize_rows(norm(total))
    assert torch.equal(values.float(), ref_values.float()) and torch.equal(scales, ref_scales)
    values, scales = fused.layer_norm_fp8_rows(x, norm)
    with torch.no_grad():
        assert torch.equal(values.float(), fused.quantize_rows(norm(x))[0].float())


def test_fused_block_computes_what_the_unfused_fp8_block_computes():
    block = sdxl_block()
    assert fused.can_fuse_block(block)
    fast, slow = fused.Fp8TransformerBlock(copy.deepcopy(block)), unfused_fp8_block(block)
    # the cross-attention as the unfused block runs it, its output quantized per row (the fused kernel's one scale
    # per image is tested in test_cross_attention)
    fast.fused_cross_attention = False
    x, text = block_inputs(block)
    with torch.inference_mode():
        got, unfused, exact = (m(x, encoder_hidden_states=text) for m in (fast, slow, block))
    assert got.shape == exact.shape and got.dtype == torch.bfloat16
    assert torch.equal(got, unfused)  # the same quantization, the same order of operations: the same bits on the CPU
    assert relative_error(got, exact) < 0.05  # fp8 rounding of every linear


def test_a_chain_of_fused_blocks_computes_what_the_unfused_fp8_blocks_compute_in_turn():
    """The chain hands each block's last residual add to the next block's first norm kernel: the same sums."""
    blocks = [sdxl_block(), sdxl_block()]
    with torch.no_grad():
        blocks[1].norm1.weight.mul_(0.5)  # two blocks that differ
    chain = fused.Fp8TransformerChain([fused.Fp8TransformerBlock(copy.deepcopy(b)) for b in blocks])
    for block in chain.blocks:
        block.fused_cross_attention = False  # as the unfused blocks quantize it: per row
    x, text = block_inputs(blocks[0])
    with torch.inference_mode():
        got = chain(x, encoder_hidden_states=text)
        unfused = x
        for block in blocks:
            unfused = unfused_fp8_block(block)(unfused, encoder_hidden_states=text)
    assert torch.equal(got, unfused)


def test_every_sdxl_block_of_the_unet_is_swapped_and_the_unet_still_agrees():
    pipe = build_random_pipeline("tiny", "bf16", "cpu")
    pipe.fuse_qkv_projections()
    unet = pipe.unet
    count = sum(type(m).__name__ == "BasicTransformerBlock" for m in unet.modules())
    call = tiny_unet_call(unet)
    before = call()
    fused.fuse_geglu_feed_forwards(unet)  # an earlier swap's fp8 weights are taken over, not quantized again
    down = next(m for m in unet.modules() if isinstance(m, fused.Fp8GegluFeedForward)).down
    assert fused.fuse_transformer_blocks(unet) == count > 0
    after = call()
    assert not any(type(m).__name__ == "BasicTransformerBlock" for m in unet.modules())
    transformers = [m for m in unet.modules() if type(m).__name__ == "Transformer2DModel"]
    assert all(len(t.transformer_blocks) == 1 and isinstance(t.transformer_blocks[0], fused.Fp8TransformerChain)
               for t in transformers)  # each model's blocks run as one chain
    assert any(m.down is down for m in unet.modules() if isinstance(m, fused.Fp8TransformerBlock))
    assert relative_error(after, before) < 0.05


def test_blocks_unlike_sdxls_are_left_as_they_are():
    pipe = build_random_pipeline("tiny", "bf16", "cpu")  # without fuse_qkv: no fused q/k/v projection to feed
    assert fused.fuse_transformer_blocks(pipe.unet) == 0
    block = sdxl_block()
    block.norm_type = "ada_norm"
    assert not fused.can_fuse_block(block)


def test_a_fused_block_refuses_attention_masks_with_a_message():
    block = sdxl_block()
    x, text = block_inputs(block)
    with pytest.raises(ValueError, match="without attention masks"):
        fused.Fp8TransformerBlock(block)(x, encoder_hidden_states=text, encoder_attention_mask=torch.ones(2, 77))


INTERPRETED = textwrap.dedent("""
    import itertools

    import torch
    from sccsdxl import fused

    torch.manual_seed(3)
    strategies = {"padded one pass": dict(CHUNK=0, SPLIT=False), "head + tail one pass": dict(CHUNK=0, SPLIT=True),
                  "two passes": dict(CHUNK=32, SPLIT=False),
                  # blocks of rows: 5 rows leave a last block with one row (of 2) or one row (of 4) in it
                  "2 rows per program": dict(ROWS=2, CHUNK=0, SPLIT=True),
                  "4 rows per program": dict(ROWS=4, CHUNK=0, SPLIT=True)}
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
    # the LayerNorm kernel; the interpreter rounds fp32 -> bf16 toward zero (the GPU to nearest), so each bf16
    # result is checked to one bf16 step
    step = 2**-7
    for rows, n_cols in ((7, 100), (4, 64), (3, 80)):  # split: a masked tail, none, an exact one; a last partial program
        norm = torch.nn.LayerNorm(n_cols).to(torch.bfloat16)
        with torch.no_grad():
            norm.weight.copy_(torch.rand(n_cols) + 0.5)
            norm.bias.copy_(torch.randn(n_cols) * 0.1)
        x = (torch.randn(rows, n_cols) * torch.logspace(-1, 1, rows)[:, None]).to(torch.bfloat16)
        residual = torch.randn(rows, n_cols).to(torch.bfloat16)
        for with_residual, per_program, split in itertools.product((False, True), (1, 2, 4), (False, True)):
            values, scales = torch.full((rows, n_cols), float("nan")), torch.zeros(rows, 1)
            total = torch.full((rows, n_cols), float("nan"), dtype=torch.bfloat16) if with_residual else None
            fused.run_layer_norm_config(x, residual if with_residual else None, total, norm.weight, norm.bias,
                                        norm.eps, values, scales, rows=per_program, split=split)
            where = ("layer norm", n_cols, with_residual, per_program, split)
            if with_residual:
                exact = x.float() + residual.float()
                assert ((total.float() - exact).abs() <= exact.abs() * step).all(), where
            with torch.no_grad():
                normed = norm(total if with_residual else x).float()
            assert torch.allclose(scales, normed.abs().amax(dim=1, keepdim=True) / fused.FP8_MAX, rtol=step), where
            assert ((values * scales - normed).abs() <= normed.abs() * step + 1e-6).all(), where
    print("kernel ok")
""")


@pytest.mark.skipif(fused.triton is None or fused.available(),
                    reason="needs the triton package; on a GPU the tests below run the compiled kernel itself (older "
                           "Triton interpreters, e.g. with torch 2.11, cannot run it)")
@pytest.mark.parametrize("branch_free_erf", ["0", "1"])
def test_kernels_in_tritons_cpu_interpreter_read_the_right_halves_rows_and_columns(branch_free_erf):
    """The Triton kernels themselves, run by Triton's interpreter on the CPU: indexing, masks and both strategies,
    GELU with libdevice's erf and with the branch-free erfc (its rcp and ex2 as the interpreter's own functions)."""
    assert_interpreted_ok(f"import os\nos.environ['SCCSDXL_BRANCH_FREE_ERF'] = '{branch_free_erf}'\n" + INTERPRETED)


def printed_per_switch(source: str, switch: str, values: tuple[str, ...], env: dict | None = None) -> dict:
    """The words ``source`` prints in a new Python for each value of the environment variable ``switch`` (the
    kernels read their switches once, when they are made)."""
    import subprocess
    import sys

    base = os.environ if env is None else env
    return {value: subprocess.run([sys.executable, "-c", source], capture_output=True, text=True, check=True,
                                  env={**base, switch: value}).stdout.split() for value in values}


@pytest.mark.skipif(fused.triton is None, reason="needs the triton package")
def test_the_geglu_kernels_row_blocks_can_be_left_out_for_an_a_b():
    count = "from sccsdxl import fused; print(*sorted(c.kwargs['ROWS'] for c in fused._configs()))"
    runs = printed_per_switch(count, "SCCSDXL_ONE_ROW_GEGLU", ("0", "1"))
    assert set(runs["0"]) == {"1", "2", "4"} and set(runs["1"]) == {"1"}
    assert runs["0"].count("1") == len(runs["1"])  # the one-row choices are the same either way


def test_the_branch_free_erfs_gelu_is_the_exact_gelu_within_fp32_rounding():
    """The branch-free erfc's formula (ERFC_COEFFICIENTS, exp2 of the exponent times log2 e, as the kernel computes it)
    in fp32 on the CPU, against GELU from math.erfc in fp64: within 5e-6 relative for |x| <= 6; more than 1e-5 only
    where GELU is below 1e-19, and 2.1e-5 at worst (BENCHMARKS.md, session 19)."""
    import math

    x = np.linspace(-12, 12, 240001).astype(np.float32)
    z = np.abs(x) * np.float32(math.sqrt(0.5))
    t = np.float32(1) / (np.float32(1) + np.float32(0.5) * z)
    p = np.full_like(t, fused.ERFC_COEFFICIENTS[-1])
    for c in reversed(fused.ERFC_COEFFICIENTS[:-1]):
        p = p * t + np.float32(c)
    erfc = t * np.exp2((p - z * z) * np.float32(1.4426950408889634))
    gelu = np.float32(0.5) * x * np.where(x >= 0, np.float32(2) - erfc, erfc)
    exact = np.array([0.5 * float(v) * math.erfc(-float(v) / math.sqrt(2)) for v in x])
    nonzero = exact != 0
    relative = np.abs(gelu[nonzero] - exact[nonzero]) / np.abs(exact[nonzero])
    assert relative[np.abs(x[nonzero]) <= 6].max() < 5e-6
    assert relative.max() < 2.1e-5 and (np.abs(exact[nonzero][relative > 1e-5]) < 1e-19).all()


@pytest.mark.skipif(fused.triton is None, reason="needs the triton package")
def test_the_branch_free_erf_is_chosen_by_the_environment_for_an_a_b():
    """The GEGLU kernel's GELU uses the branch-free erfc by default (session 20); SCCSDXL_BRANCH_FREE_ERF=0 brings back
    libdevice's erf."""
    source = ("import inspect; from sccsdxl import fused; "
              "print('tl.math.erf(' in inspect.getsource(fused._one_plus_erf.fn))")
    runs = {flag: words[-1] for flag, words in printed_per_switch(source, "SCCSDXL_BRANCH_FREE_ERF",
                                                                   ("", "0", "1")).items()}
    assert runs == {"": "False", "0": "True", "1": "False"}


@pytest.mark.skipif(fused.triton is None, reason="needs the triton package")
def test_the_kernels_tuning_is_kept_on_disk_unless_switched_off():
    """The kit's autotuned kernels ask Triton to keep their timings (cache_results); SCCSDXL_CACHE_TUNING=0 does not."""
    source = ("from sccsdxl import fused, group_norm; "
              "print(fused._geglu_fp8_rows_kernel.cache_results, fused._layer_norm_fp8_rows_kernel.cache_results, "
              "group_norm._normalize_framed_kernel.cache_results)")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_CACHE_AUTOTUNING")}
    runs = printed_per_switch(source, "SCCSDXL_CACHE_TUNING", ("", "0"), env)
    assert runs == {"": ["True"] * 3, "0": ["False"] * 3}


@pytest.mark.skipif(fused.triton is None, reason="needs the triton package")
def test_the_row_kernels_share_one_grid_given_or_chosen_by_the_autotuning():
    chosen = fused._row_grid(1000, {})  # no configuration given: a function of the autotuning's choice
    assert chosen({"ROWS": 4, "SPLIT": True}) == (250,) and chosen({"ROWS": 1, "CHUNK": 0}) == (1000,)
    assert fused._row_grid(10, {"ROWS": 4, "num_warps": 4}) == (3,)  # a last, partial block


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
def test_a_second_process_takes_the_first_ones_kept_tuning(tuning_in_two_processes):
    """The first process times the GEGLU kernel's configurations and Triton keeps the timings in its cache directory;
    a second process at the same width loads them (no "autotuning" line from Triton) and runs the same choice."""
    first, second = tuning_in_two_processes(
        "import torch; from sccsdxl import fused; "
        "fused.geglu_fp8_rows(torch.randn(256, 2 * 2560, device='cuda', dtype=torch.bfloat16)); "
        "print('chosen', fused._geglu_fp8_rows_kernel.best_config)")
    assert "Triton autotuning for function _geglu_fp8_rows_kernel" in first
    assert "Triton autotuning" not in second
    assert first.split("chosen")[-1] == second.split("chosen")[-1]


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


@gpu
@pytest.mark.parametrize("n_cols", [1280, 640, 1000])  # SDXL's two block widths, and one that is not a power of two
def test_layer_norm_kernel_matches_the_reference(n_cols):
    torch.manual_seed(9)
    norm = torch.nn.LayerNorm(n_cols).to("cuda", torch.bfloat16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_(0, 0.1)
    x, residual = ((torch.randn(1003, n_cols, device="cuda") * 3).to(torch.bfloat16) for _ in range(2))
    total, values, scales = fused.add_layer_norm_fp8_rows(x, residual, norm)  # the autotuned choice
    assert torch.equal(total, x + residual)
    with torch.no_grad():
        ref_values, ref_scales = fused.quantize_rows(norm(total))
        plain_values, plain_scales = fused.quantize_rows(norm(x))
    assert_close_to_reference(values, scales, ref_values, ref_scales)
    assert_close_to_reference(*fused.layer_norm_fp8_rows(x, norm), plain_values, plain_scales)
    for config in fused._layer_norm_fp8_rows_kernel.configs:  # and every configuration it chooses from
        for with_residual, reference in ((True, (ref_values, ref_scales)), (False, (plain_values, plain_scales))):
            values, scales = torch.empty_like(ref_values), torch.empty_like(ref_scales)
            fused.run_layer_norm_config(x, residual if with_residual else None, torch.empty_like(x), norm.weight,
                                        norm.bias, norm.eps, values, scales, rows=config.kwargs["ROWS"],
                                        num_warps=config.num_warps, split=config.kwargs["SPLIT"])
            assert_close_to_reference(values, scales, *reference)


@gpu
def test_compiled_chain_of_fused_blocks_matches_eager_and_the_unfused_fp8_blocks():
    block = sdxl_block(640, 10, 2048, device="cuda")  # the UNet's 640-wide blocks, 64 channels per head
    # two blocks: the second's first kernel also adds the first's feed-forward output
    fast = fused.Fp8TransformerChain([fused.Fp8TransformerBlock(copy.deepcopy(block)) for _ in range(2)])
    slow = unfused_fp8_block(block)
    x, text = block_inputs(block, tokens=1024, device="cuda")
    with torch.inference_mode():
        eager = fast(x, encoder_hidden_states=text)
        compiled = torch.compile(fast, fullgraph=True)(x, encoder_hidden_states=text)
        unfused = slow(slow(x, encoder_hidden_states=text), encoder_hidden_states=text)
        exact = block(block(x, encoder_hidden_states=text), encoder_hidden_states=text)
    assert relative_error(compiled, eager) < 1e-2
    assert relative_error(eager, unfused) < 1e-2  # fp32 rounding differs between the kernels and torch's ops
    assert relative_error(eager, exact) < 0.05


WARM_CACHE_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from torch._dynamo.utils import counters
    from diffusers.models.attention import BasicTransformerBlock, FeedForward
    from diffusers.models.attention_processor import FusedAttnProcessor2_0
    from sccsdxl import fused
    from sccsdxl.quant import use_compile_cache

    use_compile_cache(sys.argv[1])
    torch.manual_seed(0)
    module = torch.nn.Sequential(  # every kernel: the feed-forward's, then the plain row kernel's linear
        fused.Fp8GegluFeedForward(FeedForward(640, activation_fn="geglu").to(torch.bfloat16).cuda().eval()),
        fused.Fp8RowsLinear(torch.nn.Linear(640, 640).to(torch.bfloat16).cuda()))
    block = BasicTransformerBlock(640, 10, 64, cross_attention_dim=2048, activation_fn="geglu")  # then the norms'
    for attention in (block.attn1, block.attn2):
        attention.fuse_projections()
        attention.set_processor(FusedAttnProcessor2_0())
    block = fused.Fp8TransformerBlock(block.to("cuda", torch.bfloat16).eval())
    x = torch.randn(2, 256, 640, device="cuda", dtype=torch.bfloat16)
    text = torch.randn(2, 77, 2048, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        out = torch.compile(lambda x, text: block(module(x), encoder_hidden_states=text), fullgraph=True)(x, text)
    hits = counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]
    print(json.dumps({"sum": float(out.float().sum()), "cache_hits": hits}))
""")


@gpu
def test_compiled_fused_modules_start_warm_from_the_disk_cache_in_a_new_process(cache_in_two_processes):
    """What 04's warm start does: a second process must load the compiled graph holding the kernels from the cache."""
    runs = cache_in_two_processes(WARM_CACHE_SCRIPT)
    assert runs[1]["cache_hits"] > 0  # the second process loaded the graph, it did not compile it again
    assert runs[1]["sum"] == pytest.approx(runs[0]["sum"], rel=1e-3)
