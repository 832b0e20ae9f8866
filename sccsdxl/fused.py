"""Triton kernels that quantize a linear's input to fp8 per row in one read, and the modules that use them.

Option fused_geglu: the feed-forward's GEGLU and the fp8 row scaling of its down projection in one kernel.

With every block linear in fp8 (quant_all_linears), inductor fuses GEGLU with torchao's per-row quantization
of the down projection's input, but as a looped reduction (a first loop over each 5120-wide row for its
largest value, a second to scale and store it): 114 ms of a 630 ms UNet forward on an H200, where GEGLU alone
took 37 ms (BENCHMARKS.md). Here a Triton kernel reads the up projection's output once and writes fp8 values
and one scale per row, and the down projection runs as an fp8 matmul through torchao's scaled-mm helper, with
its weight quantized per row by torchao's own primitives (the same numbers as torchao's fp8 config). On the
H200 the kernel moves 2.5-2.9 TB/s (one pass, the row held as a 4096 + 1024 head and tail); the UNet forward
went from 611 to 589 ms with the first, padded version of it. Inside a whole batch it moves about 2.3 TB/s, where
inductor's plain GEGLU (no row reduction) moved about 3.3 in a profiled UNet forward (session 4). Its autotuning
can also choose blocks of 2 or 4 rows per program (head + tail), the form of the LayerNorm kernel's fastest choices
below (1.3-1.7x one row per program alone, session 17); SCCSDXL_ONE_ROW_GEGLU=1 in the environment leaves them out
of its choices, for an A/B on one GPU in two processes. (A persistent form, each program loading its next row
while it reduced the current one, was slower than the one-row pass at both widths and never chosen; BENCHMARKS.md,
session 17.) GELU's erf can be computed branch-free from Numerical Recipes' erfc approximation (one reciprocal, one
exponential, nine FMAs): libdevice's erf branches per element, and with it the kernel compiled to 47 instructions per
element for sm_90, by estimate about 1.5 s of instruction issue per batch of 50 at the power-capped clock of 1.6
GHz, more than its memory traffic takes (session 19). The branch-free form compiles to 35 instructions per element,
and on the H200 the tuned kernel took 0.362 ms instead of 0.453 at the 1280 level and 0.693 instead of 0.919 at the
640 level, 3.6-3.8 TB/s (session 20), so it is the default; SCCSDXL_BRANCH_FREE_ERF=0 in the environment brings back
libdevice's erf, for an A/B.

Option fp8_attn_out: each attention's output projection in fp8, its input (the attention's output, which no
kernel of inductor's produces) quantized per row by a plain row kernel. With torchao quantizing those
projections (quant_all_linears), inductor's code for that quantization took 26 ms of a 591 ms forward on the
H200, about 1.1 TB/s; this kernel takes 9 ms, about 3.3 TB/s (BENCHMARKS.md, session 7).

Option fused_norms: each transformer block runs as Fp8TransformerBlock, in which every LayerNorm, the residual
add before it and the fp8 row quantization of the linear after it are one kernel; a Transformer2DModel's blocks
run as one Fp8TransformerChain, so that the add closing each block joins the next block's first norm kernel.
Inductor's kernels for that work (LayerNorm fused with torchao's quantization) are part of the UNet's 90 ms of
norm kernels per forward at batch 25 on the H200 (GroupNorms are the rest); its coordinate-descent tuning
(autotune) cut the norms from 79 to 54 ms in an earlier configuration, at a cold compile that now exceeds 18
minutes (BENCHMARKS.md, sessions 4 and 8). The kernel reads each row once and writes it once, like the row kernel
above; its autotuning chooses, besides rows per program and warps, whether a row is held padded to a power of two or
as a head and tail like the GEGLU kernel's (1280 = 1024 + 256).
"""
from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn.functional as F


def env_flag(name: str, default: bool = False) -> bool:
    """An on/off switch from the environment (the kernels' A/B switches, Triton's interpreter): unset or empty gives
    ``default``, "0" off, anything else on. Read once, when the kernels are made."""
    value = os.environ.get(name, "")
    return default if value == "" else value != "0"


FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)
MIN_SCALE = 1e-12  # an all-zero row gets this scale instead of 0 (0/0 would make the whole row NaN)
ONE_ROW_GEGLU = env_flag("SCCSDXL_ONE_ROW_GEGLU")
BRANCH_FREE_ERF = env_flag("SCCSDXL_BRANCH_FREE_ERF", default=True)
# erfc(z) = t exp(-z^2 + P(t)), t = 1 / (1 + z / 2), z >= 0: P's coefficients from t^0 up (Numerical Recipes' erfcc,
# fractional error under 1.2e-7)
ERFC_COEFFICIENTS = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807, -1.13520398,
                     1.48851587, -0.82215223, 0.17087277)

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except ImportError:  # CPU-only installs without Triton keep the reference path
    triton = None


# each kernel's tuning timings kept in Triton's cache directory (TRITON_CACHE_DIR, else ~/.triton/cache), so that a
# later process at the same shapes skips the timing and takes the same configuration; =0 times them in every process
CACHE_TUNING = env_flag("SCCSDXL_CACHE_TUNING", default=True)


def autotune(configs: list, key: list[str], **options):
    """triton.autotune, with its cache_results on (CACHE_TUNING) where this Triton has it: a warm start then loads
    each kernel's timings instead of timing every configuration again. Triton keeps nothing for configurations with
    a pre-hook, so the kit's kernels have none."""
    if CACHE_TUNING and _autotune_keeps_results():
        options["cache_results"] = True
    return triton.autotune(configs=configs, key=key, **options)


@functools.cache
def _autotune_keeps_results() -> bool:
    """Whether this Triton's autotune takes cache_results (asked once, not at each of the kit's kernels)."""
    import inspect

    return "cache_results" in inspect.signature(triton.autotune).parameters


def available() -> bool:
    """The fused kernel needs Triton and an NVIDIA GPU (it writes e4m3fn; MI300's fp8 matmuls take e4m3fnuz)."""
    return triton is not None and torch.cuda.is_available() and torch.version.hip is None


def _fp8_outputs(rows: int, cols: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty (rows, cols) fp8 values and (rows, 1) fp32 scales: what each row kernel writes."""
    return (torch.empty((rows, cols), device=device, dtype=FP8),
            torch.empty((rows, 1), device=device, dtype=torch.float32))


def geglu_fp8_rows_reference(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GEGLU of a (rows, 2n) projection, quantized to fp8 with one scale per row: the unfused definition."""
    value, gate = hidden.float().chunk(2, dim=-1)
    return quantize_rows(value * F.gelu(gate))


if triton is not None:
    def _configs() -> list:
        """One pass (the whole row in registers, few rows per SM) or two passes over chunks (the second reads the
        row back from L2; many rows per SM): which is faster depends on the row width and the GPU. One pass holds
        the row padded to a power of two (5120 -> 8192 registers' worth) or, SPLIT, as a power-of-two head and a
        short tail (4096 + 1024), which leaves room for more rows per SM; ROWS > 1 holds that many rows per program
        (head + tail), as the LayerNorm kernel's best choices do, so that each program has more loads in flight."""
        one_pass = [triton.Config({"ROWS": 1, "CHUNK": 0, "SPLIT": split}, num_warps=w)
                    for split in (False, True) for w in (8, 16)]
        two_pass = [triton.Config({"ROWS": 1, "CHUNK": c, "SPLIT": False}, num_warps=w)
                    for c in (1024, 2048) for w in (4, 8)]
        row_blocks = [triton.Config({"ROWS": rows, "CHUNK": 0, "SPLIT": True}, num_warps=w)
                      for rows in (2, 4) for w in (4, 8, 16)]
        return one_pass + two_pass + ([] if ONE_ROW_GEGLU else row_blocks)

    def _head_and_tail(n_cols: int) -> tuple[int, int]:
        """5120 -> (4096, 1024); 2560 -> (2048, 512); 100 -> (64, 64), the tail masked; 128 -> (128, 0)."""
        head = 1 << (n_cols.bit_length() - 1)
        return head, triton.next_power_of_2(n_cols - head) if n_cols > head else 0

    if env_flag("TRITON_INTERPRET"):  # the interpreter runs no PTX: its own functions
        @triton.jit
        def approx_reciprocal(x):
            return 1.0 / x

        @triton.jit
        def approx_exp2(x):
            return tl.exp2(x)
    else:  # approximate, denormals flushed: the compiler's forms add range checks around each (ptxas, sm_90)
        @triton.jit
        def approx_reciprocal(x):
            """1 / x in fp32 as one approximate PTX instruction (about 1 ulp)."""
            return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                             is_pure=True, pack=1)

        @triton.jit
        def approx_exp2(x):
            """2 ** x in fp32 as one approximate PTX instruction (about 2 ulp, denormal results flushed to 0)."""
            return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                             is_pure=True, pack=1)

    if not BRANCH_FREE_ERF:
        @triton.jit
        def _one_plus_erf(x):
            """1 + erf(x), libdevice's erf."""
            return 1.0 + tl.math.erf(x)
    else:
        c0, c1, c2, c3, c4, c5, c6, c7, c8, c9 = (tl.constexpr(c) for c in ERFC_COEFFICIENTS)

        @triton.jit
        def _one_plus_erf(x):
            """1 + erf(x) = 2 - erfc(|x|) for x >= 0, erfc(|x|) below: no branch, and no cancellation for x << 0."""
            z = tl.abs(x)
            t = approx_reciprocal(1.0 + 0.5 * z)
            p = c9 * t + c8
            p = p * t + c7
            p = p * t + c6
            p = p * t + c5
            p = p * t + c4
            p = p * t + c3
            p = p * t + c2
            p = p * t + c1
            p = p * t + c0
            erfc = t * approx_exp2((p - z * z) * 1.4426950408889634)
            return tl.where(x >= 0, 2.0 - erfc, erfc)

    @triton.jit
    def _gated(value, gate):
        """value * GELU(gate) in fp32, GELU exact (with erf), as diffusers' GEGLU."""
        value = value.to(tl.float32)
        gate = gate.to(tl.float32)
        return value * (0.5 * gate * _one_plus_erf(gate * 0.7071067811865476))

    @triton.jit
    def _geglu(base, cols, mask, n_cols):
        return _gated(tl.load(base + cols, mask=mask, other=0.0), tl.load(base + n_cols + cols, mask=mask, other=0.0))

    @triton.jit
    def _geglu_fp8_row(hidden_ptr, out_ptr, scale_ptr, row, n_cols, hidden_stride, out_stride, BLOCK: tl.constexpr,
                       HEAD: tl.constexpr, TAIL: tl.constexpr, CHUNK: tl.constexpr, SPLIT: tl.constexpr,
                       FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr):
        """One row (int64: rows x 2n passes 2**31 at batch 50) in the configuration's strategy."""
        base = hidden_ptr + row * hidden_stride
        out_row = out_ptr + row * out_stride
        if CHUNK == 0 and SPLIT:
            cols = tl.arange(0, HEAD)
            mask = cols < n_cols
            out = _geglu(base, cols, mask, n_cols)
            largest = tl.max(tl.abs(out), axis=0)
            if TAIL > 0:
                tail_cols = HEAD + tl.arange(0, TAIL)
                tail_mask = tail_cols < n_cols
                tail = _geglu(base, tail_cols, tail_mask, n_cols)
                largest = tl.maximum(largest, tl.max(tl.abs(tail), axis=0))
            scale = tl.maximum(largest / FP8_MAX, MIN_SCALE)
            tl.store(out_row + cols, tl.clamp(out / scale, -FP8_MAX, FP8_MAX).to(out_ptr.dtype.element_ty), mask=mask)
            if TAIL > 0:
                tail_out = tl.clamp(tail / scale, -FP8_MAX, FP8_MAX).to(out_ptr.dtype.element_ty)
                tl.store(out_row + tail_cols, tail_out, mask=tail_mask)
        elif CHUNK == 0:
            cols = tl.arange(0, BLOCK)
            mask = cols < n_cols
            out = _geglu(base, cols, mask, n_cols)
            scale = tl.maximum(tl.max(tl.abs(out), axis=0) / FP8_MAX, MIN_SCALE)
            quantized = tl.clamp(out / scale, -FP8_MAX, FP8_MAX)
            tl.store(out_row + cols, quantized.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            largest = tl.zeros((CHUNK,), dtype=tl.float32)
            for start in range(0, n_cols, CHUNK):
                cols = start + tl.arange(0, CHUNK)
                mask = cols < n_cols
                largest = tl.maximum(largest, tl.abs(_geglu(base, cols, mask, n_cols)))
            scale = tl.maximum(tl.max(largest, axis=0) / FP8_MAX, MIN_SCALE)
            for start in range(0, n_cols, CHUNK):
                cols = start + tl.arange(0, CHUNK)
                mask = cols < n_cols
                quantized = tl.clamp(_geglu(base, cols, mask, n_cols) / scale, -FP8_MAX, FP8_MAX)
                tl.store(out_row + cols, quantized.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_ptr + row, scale)

    @triton.jit
    def _geglu_tile(hidden_ptr, rows, cols, n_rows, n_cols, hidden_stride):
        """GEGLU of a (rows, cols) tile in fp32, and its mask; rows past the end read nothing (GEGLU(0, 0) = 0)."""
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        at = hidden_ptr + rows[:, None] * hidden_stride + cols[None, :]
        return _gated(tl.load(at, mask=mask, other=0.0), tl.load(at + n_cols, mask=mask, other=0.0)), mask

    @triton.jit
    def _geglu_fp8_row_block(hidden_ptr, out_ptr, scale_ptr, rows, n_rows, n_cols, hidden_stride, out_stride,
                             HEAD: tl.constexpr, TAIL: tl.constexpr, FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr):
        """A block of rows, each held as a head and tail tile: one scale per row, from both tiles."""
        cols = tl.arange(0, HEAD)
        out, mask = _geglu_tile(hidden_ptr, rows, cols, n_rows, n_cols, hidden_stride)
        largest = tl.max(tl.abs(out), axis=1)
        if TAIL > 0:
            tail_cols = HEAD + tl.arange(0, TAIL)
            tail, tail_mask = _geglu_tile(hidden_ptr, rows, tail_cols, n_rows, n_cols, hidden_stride)
            largest = tl.maximum(largest, tl.max(tl.abs(tail), axis=1))
        scale = tl.maximum(largest / FP8_MAX, MIN_SCALE)
        out_rows = out_ptr + rows[:, None] * out_stride
        quantized = tl.clamp(out / scale[:, None], -FP8_MAX, FP8_MAX).to(out_ptr.dtype.element_ty)
        tl.store(out_rows + cols[None, :], quantized, mask=mask)
        if TAIL > 0:
            quantized = tl.clamp(tail / scale[:, None], -FP8_MAX, FP8_MAX).to(out_ptr.dtype.element_ty)
            tl.store(out_rows + tail_cols[None, :], quantized, mask=tail_mask)
        tl.store(scale_ptr + rows, scale, mask=rows < n_rows)

    @autotune(configs=_configs(), key=["n_cols"])
    @triton.jit
    def _geglu_fp8_rows_kernel(hidden_ptr, out_ptr, scale_ptr, n_rows, n_cols, hidden_stride, out_stride,
                               BLOCK: tl.constexpr, HEAD: tl.constexpr, TAIL: tl.constexpr, ROWS: tl.constexpr,
                               CHUNK: tl.constexpr, SPLIT: tl.constexpr, FP8_MAX: tl.constexpr,
                               MIN_SCALE: tl.constexpr):
        if ROWS == 1:
            _geglu_fp8_row(hidden_ptr, out_ptr, scale_ptr, tl.program_id(0).to(tl.int64), n_cols, hidden_stride,
                           out_stride, BLOCK, HEAD, TAIL, CHUNK, SPLIT, FP8_MAX, MIN_SCALE)
        else:  # a block of rows, head + tail
            rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
            _geglu_fp8_row_block(hidden_ptr, out_ptr, scale_ptr, rows, n_rows, n_cols, hidden_stride, out_stride,
                                 HEAD, TAIL, FP8_MAX, MIN_SCALE)

    def _row_grid(n_rows: int, config: dict):
        """The row kernels' grid, one program per block of ROWS rows: for a configuration run directly, its grid;
        for the autotuned call (``config`` without ROWS), a function of the autotuning's choice."""
        def programs(meta: dict) -> tuple[int]:
            return (triton.cdiv(n_rows, meta["ROWS"]),)
        return programs(config) if "ROWS" in config else programs

    def _launch(kernel, hidden: torch.Tensor, values: torch.Tensor, scales: torch.Tensor, **config) -> None:
        """Run ``kernel`` on (rows, 2n) ``hidden``, writing (rows, n) ``values`` and (rows, 1) ``scales``."""
        n_rows, n_cols = values.shape
        head, tail = _head_and_tail(n_cols)
        kernel[_row_grid(n_rows, config)](hidden, values, scales, n_rows, n_cols, hidden.stride(0), values.stride(0),
                                          BLOCK=triton.next_power_of_2(n_cols), HEAD=head, TAIL=tail, FP8_MAX=FP8_MAX,
                                          MIN_SCALE=MIN_SCALE, **config)

    def run_strategy(hidden: torch.Tensor, values: torch.Tensor, scales: torch.Tensor, num_warps: int = 4,
                     ROWS: int = 1, **strategy) -> None:  # noqa: N803 (the kernel's name)
        """One strategy the autotuning chooses from (ROWS, CHUNK, SPLIT), run directly: for tests and benchmarks."""
        _launch(_geglu_fp8_rows_kernel.fn, hidden, values, scales, num_warps=num_warps, ROWS=ROWS, **strategy)

    @triton_op("sccsdxl::geglu_fp8_rows", mutates_args=())
    def _geglu_fp8_rows_gpu(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, width = hidden.shape
        values, scales = _fp8_outputs(rows, width // 2, hidden.device)
        _launch(wrap_triton(_geglu_fp8_rows_kernel), hidden, values, scales)
        return values, scales


if triton is not None:
    def _whole_row_configs() -> list:
        """For kernels that hold ROWS whole rows (up to 1280 wide) per program: how many rows, how many warps."""
        return [triton.Config({"ROWS": rows}, num_warps=w) for rows in (1, 2, 4, 8) for w in (4, 8)]

    @autotune(configs=_whole_row_configs(), key=["n_cols", "HAS_RESIDUAL"])
    @triton.jit
    def _fp8_rows_kernel(x_ptr, residual_ptr, out_ptr, scale_ptr, n_rows, n_cols, x_stride, residual_stride,
                         out_stride, BLOCK: tl.constexpr, ROWS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                         FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr):
        """ROWS whole rows per program (a 1280-wide row is only 2.5 kB), each scaled by its own largest value. With
        HAS_RESIDUAL, the rows of x + residual, the sum rounded to x's dtype first, as the unfused add writes it:
        the sum itself is not written (add_fp8_rows)."""
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        x = tl.load(x_ptr + rows[:, None] * x_stride + cols[None, :], mask=mask, other=0.0)
        if HAS_RESIDUAL:
            residual = tl.load(residual_ptr + rows[:, None] * residual_stride + cols[None, :], mask=mask, other=0.0)
            x = (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)
        x = x.to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=1) / FP8_MAX, MIN_SCALE)
        quantized = tl.clamp(x / scale[:, None], -FP8_MAX, FP8_MAX).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + rows[:, None] * out_stride + cols[None, :], quantized, mask=mask)
        tl.store(scale_ptr + rows, scale, mask=rows < n_rows)

    def _launch_rows(kernel, matrix: torch.Tensor, values: torch.Tensor, scales: torch.Tensor,
                     residual: torch.Tensor | None = None, **config) -> None:
        """Run ``kernel`` on (rows, n) ``matrix`` (plus ``residual``, where given), writing (rows, n) ``values`` and
        (rows, 1) ``scales``."""
        n_rows, n_cols = matrix.shape
        added = matrix if residual is None else residual  # unread without a residual
        kernel[_row_grid(n_rows, config)](matrix, added, values, scales, n_rows, n_cols, matrix.stride(0),
                                          added.stride(0), values.stride(0), BLOCK=triton.next_power_of_2(n_cols),
                                          HAS_RESIDUAL=residual is not None, FP8_MAX=FP8_MAX, MIN_SCALE=MIN_SCALE,
                                          **config)

    def run_rows_config(matrix: torch.Tensor, values: torch.Tensor, scales: torch.Tensor, rows: int,
                        num_warps: int = 4, residual: torch.Tensor | None = None) -> None:
        """One configuration the row kernel's autotuning chooses from, run directly (with ``residual``, as
        add_fp8_rows runs it): for tests and benchmarks."""
        _launch_rows(_fp8_rows_kernel.fn, matrix, values, scales, residual, ROWS=rows, num_warps=num_warps)

    @triton_op("sccsdxl::fp8_rows", mutates_args=())
    def _fp8_rows_gpu(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values, scales = _fp8_outputs(*matrix.shape, matrix.device)
        _launch_rows(wrap_triton(_fp8_rows_kernel), matrix, values, scales)
        return values, scales

    @triton_op("sccsdxl::add_fp8_rows", mutates_args=())
    def _add_fp8_rows_gpu(x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values, scales = _fp8_outputs(*x.shape, x.device)
        _launch_rows(wrap_triton(_fp8_rows_kernel), x, values, scales, residual)
        return values, scales


if triton is not None:
    def _layer_norm_configs() -> list:
        """The whole-row choices, each with the row held padded to a power of two (1280 -> 2048 lanes) or, SPLIT, as
        a power-of-two head and tail (1024 + 256): no idle lanes, so less arithmetic and fewer registers per row."""
        return [triton.Config({**config.kwargs, "SPLIT": split}, num_warps=config.num_warps)
                for config in _whole_row_configs() for split in (False, True)]

    @triton.jit
    def _row_tiles(x_ptr, residual_ptr, at, mask, HAS_RESIDUAL: tl.constexpr):
        """A tile of x and of the residual, as stored (without a residual, x stands in for it, unused)."""
        x = tl.load(x_ptr + at, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            residual = tl.load(residual_ptr + at, mask=mask, other=0.0)
        else:
            residual = x
        return x, residual

    @triton.jit
    def _block_tiles(x_ptr, residual_ptr, rows, cols, tail_cols, n_rows, n_cols, SPLIT: tl.constexpr,
                     TAIL: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
        """ROWS rows' head (or whole padded row) tiles and, SPLIT, tail tiles; rows past the end read nothing."""
        row_mask = rows[:, None] < n_rows
        x, residual = _row_tiles(x_ptr, residual_ptr, rows[:, None] * n_cols + cols[None, :],
                                 row_mask & (cols[None, :] < n_cols), HAS_RESIDUAL)
        if SPLIT and TAIL > 0:
            tail, tail_residual = _row_tiles(x_ptr, residual_ptr, rows[:, None] * n_cols + tail_cols[None, :],
                                             row_mask & (tail_cols[None, :] < n_cols), HAS_RESIDUAL)
        else:
            tail, tail_residual = x, residual  # no tail: placeholders, unused
        return x, residual, tail, tail_residual

    @triton.jit
    def _summed(x, residual, sum_ptr, at, mask, HAS_RESIDUAL: tl.constexpr):
        """A tile of x in fp32; with a residual, x + residual rounded to x's dtype (as the unfused add) and stored."""
        if HAS_RESIDUAL:
            x = (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)
            tl.store(sum_ptr + at, x, mask=mask)
        return x.to(tl.float32)

    @triton.jit
    def _scaled_and_shifted(centred, inverse_std, weight_ptr, bias_ptr, cols, n_cols, dtype: tl.constexpr):
        """The LayerNorm's output for a tile of centred rows, rounded to the input's dtype as the unfused op rounds."""
        weight = tl.load(weight_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        return (centred * inverse_std[:, None] * weight[None, :] + bias[None, :]).to(dtype).to(tl.float32)

    @triton.jit
    def _layer_norm_block(x, residual, tail, tail_residual, rows, cols, tail_cols, sum_ptr, weight_ptr, bias_ptr,
                          out_ptr, scale_ptr, n_rows, n_cols, eps, SPLIT: tl.constexpr, TAIL: tl.constexpr,
                          HAS_RESIDUAL: tl.constexpr, FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr):
        """ROWS loaded rows: (x + residual, stored) -> LayerNorm -> fp8 values and one scale per row. The sum and
        the normalized row are rounded to the input's dtype on the way, as the unfused ops round them."""
        row_mask = rows[:, None] < n_rows
        mask = row_mask & (cols[None, :] < n_cols)
        dtype = x.dtype
        x = _summed(x, residual, sum_ptr, rows[:, None] * n_cols + cols[None, :], mask, HAS_RESIDUAL)
        total = tl.sum(x, axis=1)
        if SPLIT and TAIL > 0:
            tail_mask = row_mask & (tail_cols[None, :] < n_cols)
            tail = _summed(tail, tail_residual, sum_ptr, rows[:, None] * n_cols + tail_cols[None, :], tail_mask,
                           HAS_RESIDUAL)
            total += tl.sum(tail, axis=1)
        mean = total / n_cols
        centred = tl.where(mask, x - mean[:, None], 0.0)
        squares = tl.sum(centred * centred, axis=1)
        if SPLIT and TAIL > 0:
            tail = tl.where(tail_mask, tail - mean[:, None], 0.0)
            squares += tl.sum(tail * tail, axis=1)
        inverse_std = 1.0 / tl.sqrt(squares / n_cols + eps)
        normed = _scaled_and_shifted(centred, inverse_std, weight_ptr, bias_ptr, cols, n_cols, dtype)
        largest = tl.max(tl.abs(normed), axis=1)
        if SPLIT and TAIL > 0:
            tail = _scaled_and_shifted(tail, inverse_std, weight_ptr, bias_ptr, tail_cols, n_cols, dtype)
            largest = tl.maximum(largest, tl.max(tl.abs(tail), axis=1))
        scale = tl.maximum(largest / FP8_MAX, MIN_SCALE)
        quantized = tl.clamp(normed / scale[:, None], -FP8_MAX, FP8_MAX).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + rows[:, None] * n_cols + cols[None, :], quantized, mask=mask)
        if SPLIT and TAIL > 0:
            quantized = tl.clamp(tail / scale[:, None], -FP8_MAX, FP8_MAX).to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + rows[:, None] * n_cols + tail_cols[None, :], quantized, mask=tail_mask)
        tl.store(scale_ptr + rows, scale, mask=rows < n_rows)

    @autotune(configs=_layer_norm_configs(), key=["n_cols", "HAS_RESIDUAL"])
    @triton.jit
    def _layer_norm_fp8_rows_kernel(x_ptr, residual_ptr, sum_ptr, weight_ptr, bias_ptr, out_ptr, scale_ptr, n_rows,
                                    n_cols, eps, BLOCK: tl.constexpr, HEAD: tl.constexpr, TAIL: tl.constexpr,
                                    ROWS: tl.constexpr, SPLIT: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                                    FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr):
        """ROWS whole rows per program, each one tile of BLOCK columns or, SPLIT, a HEAD tile and a TAIL tile."""
        if SPLIT:
            cols = tl.arange(0, HEAD)
        else:
            cols = tl.arange(0, BLOCK)
        tail_cols = HEAD + tl.arange(0, TAIL if TAIL > 0 else 1)
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        x, residual, tail, tail_residual = _block_tiles(x_ptr, residual_ptr, rows, cols, tail_cols, n_rows, n_cols,
                                                        SPLIT, TAIL, HAS_RESIDUAL)
        _layer_norm_block(x, residual, tail, tail_residual, rows, cols, tail_cols, sum_ptr, weight_ptr, bias_ptr,
                          out_ptr, scale_ptr, n_rows, n_cols, eps, SPLIT, TAIL, HAS_RESIDUAL, FP8_MAX, MIN_SCALE)

    def _launch_layer_norm(kernel, x, residual, total, weight, bias, eps, values, scales, **config) -> None:
        """Run ``kernel`` on contiguous (rows, n) ``x`` (+ ``residual``, written to ``total``), writing ``values`` and
        ``scales``. Without a residual (``residual`` is ``x``), ``total`` is only a placeholder: the kernel neither
        reads nor writes it, and an output (``values``) stands in, so that no input looks written to."""
        n_rows, n_cols = x.shape
        head, tail = _head_and_tail(n_cols)
        kernel[_row_grid(n_rows, config)](x, residual, total, weight, bias, values, scales, n_rows, n_cols, eps,
                                          BLOCK=triton.next_power_of_2(n_cols), HEAD=head, TAIL=tail,
                                          HAS_RESIDUAL=residual is not x, FP8_MAX=FP8_MAX, MIN_SCALE=MIN_SCALE,
                                          **config)

    def run_layer_norm_config(x: torch.Tensor, residual: torch.Tensor | None, total: torch.Tensor | None,
                              weight: torch.Tensor, bias: torch.Tensor, eps: float, values: torch.Tensor,
                              scales: torch.Tensor, rows: int, num_warps: int = 4, split: bool = False) -> None:
        """One configuration of the LayerNorm kernel's autotuning, run directly: for tests and benchmarks."""
        _launch_layer_norm(_layer_norm_fp8_rows_kernel.fn, x, x if residual is None else residual,
                           values if total is None else total, weight, bias, eps, values, scales, ROWS=rows,
                           SPLIT=split, num_warps=num_warps)

    @triton_op("sccsdxl::layer_norm_fp8_rows", mutates_args=())
    def _layer_norm_fp8_rows_gpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        values, scales = _fp8_outputs(*x.shape, x.device)
        _launch_layer_norm(wrap_triton(_layer_norm_fp8_rows_kernel), x, x, values, weight, bias, eps, values, scales)
        return values, scales

    @triton_op("sccsdxl::add_layer_norm_fp8_rows", mutates_args=())
    def _add_layer_norm_fp8_rows_gpu(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                     eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        total = torch.empty_like(x)
        values, scales = _fp8_outputs(*x.shape, x.device)
        _launch_layer_norm(wrap_triton(_layer_norm_fp8_rows_kernel), x, residual, total, weight, bias, eps, values,
                           scales)
        return total, values, scales


def layer_norm_fp8_rows_reference(x: torch.Tensor, norm: torch.nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm, then torchao's per-row fp8 quantization of its output: the unfused definition."""
    return quantize_rows(norm(x))


def layer_norm_fp8_rows(x: torch.Tensor, norm: torch.nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, n) -> ``norm``(x) as (rows, n) fp8 values and (rows, 1) fp32 scales, one kernel on a GPU."""
    if x.is_cuda and triton is not None:
        return _layer_norm_fp8_rows_gpu(x.contiguous(), norm.weight, norm.bias, norm.eps)
    return layer_norm_fp8_rows_reference(x, norm)


def add_layer_norm_fp8_rows(x: torch.Tensor, residual: torch.Tensor,
                            norm: torch.nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, n) x + residual, and ``norm`` of that sum as fp8 values with one fp32 scale per row."""
    if x.is_cuda and triton is not None:
        return _add_layer_norm_fp8_rows_gpu(x.contiguous(), residual.contiguous(), norm.weight, norm.bias, norm.eps)
    total = x + residual
    return (total, *layer_norm_fp8_rows_reference(total, norm))


def fp8_rows(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, n) bf16/fp16/fp32 -> (rows, n) fp8 values and (rows, 1) fp32 scales, one scale per row."""
    if matrix.is_cuda and triton is not None:
        return _fp8_rows_gpu(matrix.contiguous())
    return quantize_rows(matrix)


def add_fp8_rows(x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8_rows of x + residual, both (rows, n), without writing the sum: a residual stream's last add where only a
    linear in fp8 reads it (a transformer's proj_out under fp8_projections)."""
    if x.is_cuda and triton is not None:
        return _add_fp8_rows_gpu(x.contiguous(), residual.contiguous())
    return quantize_rows(x + residual)


def geglu_fp8_rows(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, 2n) up-projection output -> (rows, n) fp8 GEGLU values and (rows, 1) fp32 scales."""
    if hidden.is_cuda and triton is not None:
        return _geglu_fp8_rows_gpu(hidden.contiguous())
    return geglu_fp8_rows_reference(hidden)


def quantize_rows(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row fp8 with torchao's primitives, as its fp8 config quantizes weights and activations: (rows, n) fp8
    and (rows, 1) fp32 scales."""
    from torchao.quantization.quant_primitives import _choose_scale_float8, _quantize_affine_float8

    matrix = matrix.detach().float()
    scale = _choose_scale_float8(matrix, [1, matrix.shape[1]], FP8).clamp(min=MIN_SCALE)
    return _quantize_affine_float8(matrix, scale, FP8), scale


class Fp8RowWeight(torch.nn.Module):
    """A linear's weight quantized per output row, as torchao's fp8 config does, and the fp8 matmul with it."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        weight, scale = quantize_rows(linear.weight)
        self.register_buffer("weight", weight)  # (out, in) fp8, row-major: its .t() is what scaled-mm wants
        self.register_buffer("scale", scale.reshape(1, -1))
        self.bias = linear.bias

    def matmul(self, values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(rows, in) fp8 activations with their (rows, 1) scales -> (rows, out) in ``dtype``."""
        from torchao.float8.inference import addmm_float8_unwrapped_inference

        if values.is_cuda:
            return addmm_float8_unwrapped_inference(values, scales, self.weight.t(), self.scale, output_dtype=dtype,
                                                    bias=self.bias, use_fast_accum=True)
        # the same product from the dequantized values (torch's CPU scaled-mm takes per-row scales only lately)
        return F.linear((values.float() * scales).to(dtype), (self.weight.float() * self.scale.t()).to(dtype),
                        self.bias)


class Fp8GegluFeedForward(torch.nn.Module):
    """Stands in for diffusers' GEGLU FeedForward: up projection as before (torchao quantizes it later), then
    the fused GEGLU + fp8 row quantization, then the down projection as an fp8 matmul."""

    def __init__(self, feed_forward: torch.nn.Module):
        super().__init__()
        geglu, down = feed_forward.net[0], feed_forward.net[-1]
        self.proj = geglu.proj
        self.down = Fp8RowWeight(down)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        up = self.proj(hidden_states)
        out = self.down.matmul(*geglu_fp8_rows(up.reshape(-1, up.shape[-1])), up.dtype)
        return out.reshape(*up.shape[:-1], out.shape[-1])


class Fp8RowsLinear(torch.nn.Module):
    """A linear in fp8 whose input is quantized per row by one Triton kernel (fp8_rows), for inputs that no
    fused producer quantizes: the attention's output, which a cuDNN/flash kernel writes."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.linear = Fp8RowWeight(linear)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = self.linear.matmul(*fp8_rows(hidden_states.reshape(-1, hidden_states.shape[-1])), hidden_states.dtype)
        return out.reshape(*hidden_states.shape[:-1], out.shape[-1])


def _row_weight(linear: torch.nn.Module) -> Fp8RowWeight:
    """The fp8 weight of a linear, or the one an earlier swap (fp8_attn_out) already made."""
    return linear.linear if isinstance(linear, Fp8RowsLinear) else Fp8RowWeight(linear)


def _split_heads(projected: torch.Tensor, batch: int, parts: int, heads: int) -> tuple[torch.Tensor, ...]:
    """(batch * tokens, parts * width) projections -> ``parts`` (batch, heads, tokens, head size) views, in the
    order diffusers' fused q/k/v and k/v projections concatenate them."""
    head_size = projected.shape[-1] // parts // heads
    return projected.view(batch, -1, parts, heads, head_size).permute(2, 0, 3, 1, 4).unbind(0)


def _merge_heads(attended: torch.Tensor) -> torch.Tensor:
    """(batch, heads, tokens, head size) -> (batch * tokens, heads * head size)."""
    batch, heads, tokens, head_size = attended.shape
    return attended.transpose(1, 2).reshape(batch * tokens, heads * head_size)


def cross_attend(query: torch.Tensor, kv: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """SDPA of (batch * tokens, width) queries over the fused k/v projection of the text ((batch * keys, 2 width)
    or (batch, keys, 2 width)), the heads merged back: (batch * tokens, width)."""
    (q,) = _split_heads(query, batch, 1, heads)
    return _merge_heads(F.scaled_dot_product_attention(q, *_split_heads(kv, batch, 2, heads)))


def _plain_attention(attention: torch.nn.Module) -> bool:
    """A diffusers Attention whose processor does nothing beyond projections, SDPA and the output projection."""
    return (attention.spatial_norm is None and attention.group_norm is None and attention.norm_q is None
            and attention.norm_k is None and attention.norm_cross is None and not attention.residual_connection
            and attention.rescale_output_factor == 1.0
            and math.isclose(attention.scale, (attention.inner_dim // attention.heads) ** -0.5)  # SDPA's own scale
            and type(attention.processor).__name__ in ("FusedAttnProcessor2_0", "AttnProcessor2_0"))


def can_fuse_block(block: torch.nn.Module) -> bool:
    """A BasicTransformerBlock as SDXL builds it, after fuse_qkv: LayerNorms with weights and biases, fused q/k/v
    self-attention, cross-attention with fused k/v, a GEGLU feed-forward (or its fused_geglu or fused_ffn_gemm
    form)."""
    if type(block).__name__ != "BasicTransformerBlock" or block.norm_type != "layer_norm":
        return False
    if (block.pos_embed is not None or block.only_cross_attention or block._chunk_size is not None
            or block.attn2 is None):
        return False
    norms = (block.norm1, block.norm2, block.norm3)
    if not all(isinstance(n, torch.nn.LayerNorm) and n.weight is not None and n.bias is not None for n in norms):
        return False
    attn1, attn2 = block.attn1, block.attn2
    return (hasattr(attn1, "to_qkv") and hasattr(attn2, "to_kv") and _plain_attention(attn1) and _plain_attention(attn2)
            and (isinstance(block.ff, Fp8GegluFeedForward) or _takes_fp8_rows(block.ff)
                 or is_geglu_feed_forward(block.ff)))


def _takes_fp8_rows(feed_forward: torch.nn.Module) -> bool:
    """fused_ffn_gemm's feed-forward (sccsdxl.ffn_gemm), which runs from the norm kernel's fp8 rows as they are."""
    return callable(getattr(feed_forward, "from_fp8", None))


class Fp8TransformerBlock(torch.nn.Module):
    """Stands in for a BasicTransformerBlock that can_fuse_block accepts, computing the same: every LayerNorm runs
    with the residual add before it and the fp8 row quantization of the linear after it in one kernel, every
    linear in fp8 (weights per row, as torchao's fp8 config) but the cross-attention's key/value projection of the
    77 text tokens, which stays the module it was (quantize_ may take it later, with quant_all_linears)."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = block.norm1, block.norm2, block.norm3
        attn1, attn2 = block.attn1, block.attn2
        self.heads1, self.heads2 = attn1.heads, attn2.heads
        self.qkv, self.out1 = Fp8RowWeight(attn1.to_qkv), _row_weight(attn1.to_out[0])
        self.q2, self.kv2, self.out2 = Fp8RowWeight(attn2.to_q), attn2.to_kv, _row_weight(attn2.to_out[0])
        from .cross_attention import FUSED_CROSS_ATTENTION

        # the cross-attention as one kernel writing the output projection's fp8 rows (sccsdxl.cross_attention)
        self.fused_cross_attention = FUSED_CROSS_ATTENTION
        ff = block.ff
        self.feed_forward = ff if _takes_fp8_rows(ff) else None
        if self.feed_forward is not None:
            self.up = self.down = None
        elif isinstance(ff, Fp8GegluFeedForward):
            self.up, self.down = Fp8RowWeight(ff.proj), ff.down
        else:
            self.up, self.down = Fp8RowWeight(ff.net[0].proj), Fp8RowWeight(ff.net[-1])

    def step(self, x: torch.Tensor, pending: torch.Tensor | None, text: torch.Tensor,
             batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One block on (batch * tokens, width) rows. ``pending`` is the block before's feed-forward output, not yet
        added to ``x``: its residual add joins this block's first norm kernel. Returns ``x`` and this block's own
        pending output."""
        dtype = x.dtype
        if pending is None:
            values, scales = layer_norm_fp8_rows(x, self.norm1)
        else:
            x, values, scales = add_layer_norm_fp8_rows(pending, x, self.norm1)
        qkv = self.qkv.matmul(values, scales, dtype)
        attended = _merge_heads(F.scaled_dot_product_attention(*_split_heads(qkv, batch, 3, self.heads1)))
        x, values, scales = add_layer_norm_fp8_rows(self.out1.matmul(*fp8_rows(attended), dtype), x, self.norm2)
        query = self.q2.matmul(values, scales, dtype)
        if self.fused_cross_attention:
            from .cross_attention import cross_attention_fp8_rows

            values, scales = cross_attention_fp8_rows(query, self.kv2(text), batch, self.heads2)
        else:
            values, scales = fp8_rows(cross_attend(query, self.kv2(text), batch, self.heads2))
        x, values, scales = add_layer_norm_fp8_rows(self.out2.matmul(values, scales, dtype), x, self.norm3)
        if self.feed_forward is not None:
            return x, self.feed_forward.from_fp8(values, scales, dtype)
        up = self.up.matmul(values, scales, dtype)
        return x, self.down.matmul(*geglu_fp8_rows(up), dtype)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None,
                encoder_attention_mask: torch.Tensor | None = None, **unused) -> torch.Tensor:
        return _run_chain([self], hidden_states, encoder_hidden_states, attention_mask, encoder_attention_mask)


class Fp8TransformerChain(torch.nn.Module):
    """A Transformer2DModel's whole list of Fp8TransformerBlocks, called once in the list's place: each block's last
    residual add is done by the next block's first norm kernel, so only the chain's last one is a kernel of its own."""

    def __init__(self, blocks: list[Fp8TransformerBlock]):
        super().__init__()
        self.blocks = torch.nn.ModuleList(blocks)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None,
                encoder_attention_mask: torch.Tensor | None = None, unsummed: bool = False,
                **unused) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """As diffusers' blocks in turn; ``unsummed``: the (batch * tokens, width) residual stream and the last
        block's output not yet added, for a reader that adds them in a kernel of its own (fp8_projections)."""
        return _run_chain(self.blocks, hidden_states, encoder_hidden_states, attention_mask, encoder_attention_mask,
                          unsummed=unsummed)


def _run_chain(blocks, hidden_states: torch.Tensor, text: torch.Tensor, *masks,
               unsummed: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    if any(mask is not None for mask in masks):
        raise ValueError("fused_norms builds SDXL's transformer blocks, which run without attention masks")
    batch, tokens, width = hidden_states.shape
    x, pending = hidden_states.reshape(batch * tokens, width), None
    for block in blocks:
        x, pending = block.step(x, pending, text, batch)
    return (x, pending) if unsummed else (x + pending).view(batch, tokens, width)


def fuse_transformer_blocks(root: torch.nn.Module) -> int:
    """Replace each list of transformer blocks under ``root`` (a Transformer2DModel's ``transformer_blocks``) whose
    every block can_fuse_block accepts by one Fp8TransformerChain of Fp8TransformerBlocks; returns how many blocks."""
    count = 0
    for module in list(root.modules()):
        blocks = getattr(module, "transformer_blocks", None)
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks) and all(map(can_fuse_block, blocks)):
            chain = Fp8TransformerChain([Fp8TransformerBlock(block) for block in blocks])
            module.transformer_blocks = torch.nn.ModuleList([chain])
            count += len(blocks)
    return count


def is_geglu_feed_forward(module: torch.nn.Module) -> bool:
    """diffusers' FeedForward with a GEGLU activation (every feed-forward of the SDXL UNet)."""
    net = getattr(module, "net", None)
    return (type(module).__name__ == "FeedForward" and net is not None and type(net[0]).__name__ == "GEGLU"
            and isinstance(net[-1], torch.nn.Linear))


def swap_modules(root: torch.nn.Module, accept, replacement) -> int:
    """Replace every module under ``root`` that ``accept`` takes by ``replacement(module)``; returns how many."""
    targets = [(name, module) for name, module in root.named_modules() if accept(module)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent_name) if parent_name else root, child, replacement(module))
    return len(targets)


def fuse_geglu_feed_forwards(root: torch.nn.Module) -> int:
    """Swap every GEGLU FeedForward under ``root`` for Fp8GegluFeedForward; returns how many."""
    return swap_modules(root, is_geglu_feed_forward, Fp8GegluFeedForward)


def quantize_attention_outputs(root: torch.nn.Module, scope: str) -> int:
    """Swap the output projection of every diffusers Attention whose name contains ``scope`` for an
    Fp8RowsLinear; returns how many."""
    attentions = [m for name, m in root.named_modules() if type(m).__name__ == "Attention" and scope in name]
    for attention in attentions:
        attention.to_out[0] = Fp8RowsLinear(attention.to_out[0])
    return len(attentions)
