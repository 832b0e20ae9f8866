"""Option fused_ffn_gemm: each feed-forward's up projection, GEGLU and fp8 quantization as one Triton GEMM kernel,
and its down projection as a blockwise-scaled fp8 GEMM.

With fused_geglu a feed-forward is three steps: the up projection's fp8 GEMM writes its (rows, 2n) output in bf16,
a Triton kernel reads it back for GEGLU and each row's fp8 scale, and the down projection's fp8 GEMM reads that.
The GEGLU kernel alone took 43 ms of a 556 ms UNet forward on an H200 at batch 25 with guidance (BENCHMARKS.md,
session 10). Here one kernel keeps both halves of the up projection for a tile of rows and 128 GEGLU columns,
adds the bias, applies GEGLU and writes e4m3 with one scale per row of each 128 columns: the activation layout of
the (1x128, 128x128) blockwise-scaled GEMM that torch._scaled_mm runs through cuBLAS on Hopper, which then runs the
down projection with its weight in 128x128 blocks. The (rows, 2n) intermediate is never written. Measured on the
H200 (benchmarks/geglu_gemm_h200.py, BENCHMARKS.md session 12): correct, but 0.92x and 0.98x fused_geglu's
feed-forward, because this kernel's GEMM runs at 813 TFLOP/s where cuBLAS's fp8 GEMM reaches 1,333.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from .fused import (FP8, FP8_MAX, MIN_SCALE, Fp8RowWeight, autotune, fp8_rows, is_geglu_feed_forward, swap_modules,
                    triton)

BLOCK = 128  # GEGLU columns that share one fp8 scale per row; weight blocks are BLOCK x BLOCK

if triton is not None:
    import triton.language as tl
    from torch.library import triton_op, wrap_triton


def _padded_blocks(matrix: torch.Tensor, rows_per: int) -> torch.Tensor:
    """(rows, cols) -> (row blocks, rows_per, col blocks, BLOCK) fp32, zero-padded to whole blocks."""
    rows, cols = matrix.shape
    padded = F.pad(matrix.float(), (0, -cols % BLOCK, 0, -rows % rows_per))
    return padded.reshape(padded.shape[0] // rows_per, rows_per, padded.shape[1] // BLOCK, BLOCK)


def expand_blocks(scale: torch.Tensor, rows_per: int, shape: tuple[int, int]) -> torch.Tensor:
    """Block scales (row blocks, col blocks) spread over each block's ``rows_per`` x BLOCK elements, cut to
    ``shape``."""
    full = scale.repeat_interleave(rows_per, dim=0).repeat_interleave(BLOCK, dim=1)
    return full[:shape[0], :shape[1]]


def quantize_blocks(matrix: torch.Tensor, rows_per: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, n) -> e4m3 values and fp32 scales, one per ``rows_per`` x 128 block: (ceil(rows / rows_per),
    ceil(n / 128))."""
    scale = (_padded_blocks(matrix, rows_per).abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=MIN_SCALE)
    values = (matrix.float() / expand_blocks(scale, rows_per, matrix.shape)).clamp(-FP8_MAX, FP8_MAX)
    return values.to(FP8), scale


def dequantize_blocks(values: torch.Tensor, scales: torch.Tensor, rows_per: int) -> torch.Tensor:
    return values.float() * expand_blocks(scales, rows_per, values.shape)


def quantize_row_blocks(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, n) -> e4m3 values and (rows, ceil(n / 128)) fp32 scales, one per row of each 128 columns."""
    return quantize_blocks(matrix, 1)


def dequantize_row_blocks(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return dequantize_blocks(values, scales, 1)


def geglu_reference(values: torch.Tensor, scales: torch.Tensor, up: Fp8RowWeight) -> torch.Tensor:
    """The up projection of fp8 rows (with their (rows, 1) scales) and GEGLU, in fp32: the kernel before its
    rounding."""
    weight = up.weight.float() * up.scale.reshape(-1, 1)
    bias = None if up.bias is None else up.bias.float()
    value, gate = F.linear(values.float() * scales, weight, bias).chunk(2, dim=-1)
    return value * F.gelu(gate)


def geglu_fp8_blocks_reference(values: torch.Tensor, scales: torch.Tensor,
                               up: Fp8RowWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """What the kernel computes, in torch: geglu_reference, then quantize_row_blocks."""
    return quantize_row_blocks(geglu_reference(values, scales, up))


if triton is not None:
    def _configs() -> list:
        # two BM x 128 fp32 accumulators. Compiled for sm_90 on a CPU (Triton 3.8), BM 128 with 8 warps took 222-232
        # registers and no spills, BM 64 with 4 warps spilled 28-72 bytes, BM 128 with 4 warps 1.7-2.1 kB (left out)
        return [triton.Config({"BM": bm, "BK": bk, "GROUP_M": 8}, num_warps=warps, num_stages=stages)
                for bm, bk, warps, stages in [(128, 128, 8, 3), (128, 128, 8, 4), (128, 64, 8, 4),
                                              (64, 128, 4, 4), (64, 64, 4, 5)]]

    def _fits(configs, named_args, **kwargs):
        """Only K steps that divide the model width (the loop reads whole steps)."""
        return [c for c in configs if named_args["K"] % c.kwargs["BK"] == 0]

    @triton.jit
    def grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
        """GROUP_M row blocks at a time down each column block: neighbouring programs share rows and weights in L2."""
        in_group = GROUP_M * num_n
        first_m = (pid // in_group) * GROUP_M
        group_size = min(num_m - first_m, GROUP_M)
        return first_m + (pid % in_group) % group_size, (pid % in_group) // group_size

    @triton.jit
    def geglu_epilogue(value, gate, rm, rn, pid_n, M, N, x_scale_ptr, w_scale_ptr, bias_ptr, out_ptr, out_scale_ptr,
                       HAS_BIAS: tl.constexpr, BLOCK_SCALES: tl.constexpr, FP8_MAX: tl.constexpr,
                       MIN_SCALE: tl.constexpr):
        """A tile's fp32 sums of rows ``rm`` by GEGLU columns ``rn`` (block ``pid_n``) to its output: the row and
        weight scales and bias applied, value * gelu(gate), and with BLOCK_SCALES e4m3 divided by each row's largest
        over FP8_MAX, that scale stored at out_scale[pid_n, row]."""
        m_ok = rm < M
        x_scale = tl.load(x_scale_ptr + rm, mask=m_ok, other=0.0)[:, None]
        value = value * x_scale * tl.load(w_scale_ptr + rn)[None, :]
        gate = gate * x_scale * tl.load(w_scale_ptr + N + rn)[None, :]
        if HAS_BIAS:
            value += tl.load(bias_ptr + rn).to(tl.float32)[None, :]
            gate += tl.load(bias_ptr + N + rn).to(tl.float32)[None, :]
        out = value * (0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476)))
        if BLOCK_SCALES:
            scale = tl.maximum(tl.max(tl.abs(out), axis=1) / FP8_MAX, MIN_SCALE)
            out = tl.clamp(out / scale[:, None], -FP8_MAX, FP8_MAX)
            tl.store(out_scale_ptr + pid_n.to(tl.int64) * M + rm, scale, mask=m_ok)
        tl.store(out_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=m_ok[:, None])

    @autotune(configs=_configs(), key=["M", "K", "N", "BLOCK_SCALES"], prune_configs_by={"early_config_prune": _fits})
    @triton.jit
    def _geglu_gemm_kernel(x_ptr, x_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr, out_scale_ptr, M, K, N,
                           HAS_BIAS: tl.constexpr, BLOCK_SCALES: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                           GROUP_M: tl.constexpr, FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr):
        """For BM rows and 128 GEGLU columns j: value = x . w[j] and gate = x . w[N + j] from e4m3 with their row
        scales (and bias), out = value * gelu(gate). With BLOCK_SCALES in e4m3, each row's 128 values divided by
        their largest over FP8_MAX, that scale stored at out_scale[column block, row]; else as it is, in out's dtype
        (benchmarks/geglu_gemm_h200.py times that too)."""
        BN: tl.constexpr = 128
        pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BM), N // BN, GROUP_M)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        m_ok = rm < M
        x_at = x_ptr + rm.to(tl.int64)[:, None] * K + rk[None, :]
        value_at = w_ptr + rn.to(tl.int64)[None, :] * K + rk[:, None]  # (BK, BN): weight rows, K contiguous
        gate_at = value_at + N.to(tl.int64) * K
        value = tl.zeros((BM, BN), dtype=tl.float32)
        gate = tl.zeros((BM, BN), dtype=tl.float32)
        for _ in range(0, K, BK):
            x = tl.load(x_at, mask=m_ok[:, None], other=0.0)
            value = tl.dot(x, tl.load(value_at), value)
            gate = tl.dot(x, tl.load(gate_at), gate)
            x_at += BK
            value_at += BK
            gate_at += BK
        geglu_epilogue(value, gate, rm, rn, pid_n, M, N, x_scale_ptr, w_scale_ptr, bias_ptr, out_ptr, out_scale_ptr,
                       HAS_BIAS, BLOCK_SCALES, FP8_MAX, MIN_SCALE)

    def _launch(kernel, values, scales, weight, weight_scale, bias, out, out_scales, **config) -> None:
        """The kernel over (rows, K) fp8 ``values``; ``out_scales`` None writes the plain GEGLU in ``out``'s dtype."""
        rows, k = values.shape
        n = weight.shape[0] // 2
        grid = (lambda meta: (triton.cdiv(rows, meta["BM"]) * (n // BLOCK),)) if not config else \
            (triton.cdiv(rows, config["BM"]) * (n // BLOCK),)
        kernel[grid](values, scales, weight, weight_scale, weight_scale if bias is None else bias, out,
                     scales if out_scales is None else out_scales, rows, k, n, HAS_BIAS=bias is not None,
                     BLOCK_SCALES=out_scales is not None, FP8_MAX=FP8_MAX, MIN_SCALE=MIN_SCALE, **config)

    def run_geglu_gemm_config(values: torch.Tensor, scales: torch.Tensor, up: Fp8RowWeight, block_m: int,
                              block_k: int, num_warps: int = 4, group_m: int = 8, num_stages: int = 3,
                              out_dtype: torch.dtype = FP8) -> tuple[torch.Tensor, torch.Tensor]:
        """One tile configuration, run directly (for tests, and Triton's CPU interpreter, which cannot autotune).
        With ``out_dtype`` float32 the values come out unrounded (the interpreter's own e4m3 cast is not exact)."""
        out, out_scales = _outputs(values, up.weight, out_dtype)
        _launch(_geglu_gemm_kernel.fn, values, scales, up.weight, up.scale, up.bias, out, out_scales, BM=block_m,
                BK=block_k, GROUP_M=group_m, num_warps=num_warps, num_stages=num_stages)
        return out, out_scales.t()

    @triton_op("sccsdxl::geglu_fp8_blocks", mutates_args=())
    def _geglu_fp8_blocks_gpu(values: torch.Tensor, scales: torch.Tensor, weight: torch.Tensor,
                              weight_scale: torch.Tensor,
                              bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        out, out_scales = _outputs(values, weight)
        _launch(wrap_triton(_geglu_gemm_kernel), values, scales, weight, weight_scale, bias, out, out_scales)
        return out, out_scales


def _outputs(values: torch.Tensor, weight: torch.Tensor,
             dtype: torch.dtype = FP8) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, n) e4m3 (or ``dtype``) and the (n / 128, rows) scales, rows contiguous (what cuBLAS's 1x128 scaling
    reads)."""
    n = weight.shape[0] // 2
    return (torch.empty(values.shape[0], n, device=values.device, dtype=dtype),
            torch.empty(n // BLOCK, values.shape[0], device=values.device, dtype=torch.float32))


def geglu_fp8_blocks(values: torch.Tensor, scales: torch.Tensor, up: Fp8RowWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 rows (rows, K) with (rows, 1) scales -> GEGLU of their up projection as (rows, n) e4m3 and (rows, n / 128)
    scales: on a GPU the Triton kernel (the scales a transposed view, rows contiguous), else the reference."""
    if values.is_cuda and triton is not None:
        out, out_scales = _geglu_fp8_blocks_gpu(values, scales, up.weight, up.scale, up.bias)
        return out, out_scales.t()
    return geglu_fp8_blocks_reference(values, scales, up)


@torch.library.custom_op("sccsdxl::fp8_blockwise_linear", mutates_args=())
def _fp8_blockwise_linear(values: torch.Tensor, scales_by_block: torch.Tensor, weight: torch.Tensor,
                          weight_scale: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """cuBLAS's blockwise fp8 GEMM, opaque to the compiler (which then leaves the scales' layout alone):
    ``scales_by_block`` is (in / 128, rows) and contiguous, so that its transpose is the rows-contiguous 1x128 scale
    tensor cuBLAS wants. Rows are padded to a multiple of 4, which cuBLAS needs (every UNet row count is one)."""
    rows = values.shape[0]
    if rows % 4:
        pad = 4 - rows % 4
        values = torch.cat([values, values.new_zeros(pad, values.shape[1])])
        scales_by_block = torch.cat([scales_by_block, scales_by_block.new_ones(scales_by_block.shape[0], pad)], dim=1)
    args = (values, weight.t())
    kwargs = {"scale_a": scales_by_block.t(), "scale_b": weight_scale.t(), "out_dtype": torch.bfloat16}
    if bias is not None and _bias_in_gemm():
        out = torch._scaled_mm(*args, bias=bias, **kwargs)
    else:
        out = torch._scaled_mm(*args, **kwargs)
        out = out if bias is None else out + bias
    return out if out.shape[0] == rows else out[:rows].clone()  # a custom op returns no views


@_fp8_blockwise_linear.register_fake
def _(values, scales_by_block, weight, weight_scale, bias):
    return values.new_empty((values.shape[0], weight.shape[0]), dtype=torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _bias_in_gemm() -> bool:
    """Whether this cuBLAS adds a bias inside the blockwise GEMM (else it is added after)."""
    return _probe(bias=True)


def _probe(bias: bool) -> bool:
    """A 128 x 256 x 256 blockwise GEMM on the GPU (two blocks along K and N, so that no scale is read as per row
    or per tensor): whether this torch and cuBLAS run it."""
    values = torch.zeros(128, 256, device="cuda", dtype=FP8)
    weight = torch.zeros(256, 256, device="cuda", dtype=FP8)
    kwargs = {"bias": torch.zeros(256, device="cuda", dtype=torch.bfloat16)} if bias else {}
    try:
        torch._scaled_mm(values, weight.t(), scale_a=torch.ones(2, 128, device="cuda").t(),
                         scale_b=torch.ones(2, 2, device="cuda").t(), out_dtype=torch.bfloat16, **kwargs)
        return True
    except (RuntimeError, ValueError):  # torch raises either, by the check that fails
        return False


@functools.lru_cache(maxsize=None)
def blockwise_gemm_available() -> bool:
    """The (1x128, 128x128) fp8 GEMM: cuBLAS 12.9 or later through torch._scaled_mm, on Hopper (sm_90) only."""
    if triton is None or not torch.cuda.is_available() or torch.version.hip is not None:
        return False
    return torch.cuda.get_device_capability(0)[0] == 9 and _probe(bias=False)


class Fp8BlockWeight(torch.nn.Module):
    """A linear's weight in e4m3 with one scale per 128 x 128 block, and its bias; the matmul with it takes
    activations with one scale per row of each 128 columns."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        values, scale = quantize_blocks(linear.weight.detach(), BLOCK)
        self.register_buffer("weight", values)  # (out, in)
        self.register_buffer("scale", scale)  # (out / 128, in / 128), rounded up
        self.bias = linear.bias

    def dequantized(self) -> torch.Tensor:
        return dequantize_blocks(self.weight, self.scale, BLOCK)

    def matmul(self, values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(rows, in) e4m3 with (rows, in / 128) scales -> (rows, out) in ``dtype``."""
        if values.is_cuda:
            return _fp8_blockwise_linear(values, scales.t().contiguous(), self.weight, self.scale, self.bias).to(dtype)
        bias = None if self.bias is None else self.bias.float()
        return F.linear(dequantize_row_blocks(values, scales), self.dequantized(), bias).to(dtype)


def can_fuse_feed_forward(module: torch.nn.Module) -> bool:
    """diffusers' GEGLU FeedForward whose GEGLU width is two or more whole 128-column blocks (with one, cuBLAS would
    read the scales as one per row) and whose model width is whole 64-wide steps of the kernel's loop; every one of
    SDXL's is."""
    if not is_geglu_feed_forward(module):
        return False
    width = module.net[-1].in_features
    return width % BLOCK == 0 and width >= 2 * BLOCK and module.net[0].proj.in_features % 64 == 0


class Fp8GegluGemmFeedForward(torch.nn.Module):
    """Stands in for a GEGLU FeedForward that can_fuse_feed_forward accepts: its input quantized per row (by the
    LayerNorm kernel under fused_norms, else by fp8_rows), the up projection with GEGLU as one kernel, the down
    projection blockwise."""

    def __init__(self, feed_forward: torch.nn.Module):
        super().__init__()
        self.up = Fp8RowWeight(feed_forward.net[0].proj)
        self.down = Fp8BlockWeight(feed_forward.net[-1])

    def from_fp8(self, values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """fp8 rows (rows, width) with their (rows, 1) scales -> the feed-forward's (rows, width) output."""
        return self.down.matmul(*geglu_fp8_blocks(values, scales, self.up), dtype)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        rows = hidden_states.reshape(-1, hidden_states.shape[-1])
        return self.from_fp8(*fp8_rows(rows), hidden_states.dtype).reshape(hidden_states.shape)


def fuse_feed_forward_gemms(root: torch.nn.Module) -> int:
    """Swap every feed-forward under ``root`` that can_fuse_feed_forward accepts; returns how many."""
    return swap_modules(root, can_fuse_feed_forward, Fp8GegluGemmFeedForward)
