"""Would each feed-forward's GEGLU run inside its up projection's fp8 GEMM?

With `fused_geglu` the feed-forward is three steps: cuBLAS's fp8 GEMM writes the up projection (rows, 2n) in bf16,
sccsdxl.fused's kernel reads it back, computes value * gelu(gate) and quantizes each row to fp8 (43 ms of a 556 ms
UNet forward on the H200 at batch 25 with guidance, BENCHMARKS.md, session 10), and the down projection's fp8 GEMM
reads that. Here one Triton kernel computes, for a tile of rows and 128 GEGLU columns, both halves of the up
projection (two accumulators over the same fp8 input), applies GEGLU and writes the result: in bf16, or in e4m3 with
one scale per row of each 128-column block, the activation layout of a blockwise-scaled GEMM (1x128 activation
blocks, 128x128 weight blocks), which torch._scaled_mm runs through cuBLAS on Hopper. The (rows, 2n) bf16
intermediate is never written. The script times, at the UNet's two feed-forward shapes (50 rows: batch 25 with
guidance), the kit's three steps against the fused kernel followed by the per-row quantization and row-scaled down
projection (bf16 out), and against the fused kernel writing fp8 blocks followed by the blockwise down projection
(fp8 out); each piece alone, with TFLOP/s; and each path's error against the same feed-forward in fp32. Run on a GPU
node:
  python3 benchmarks/geglu_gemm_h200.py            # or --interpret on a CPU: tiny shapes, correctness only
"""
from __future__ import annotations

import os
import sys

if "--interpret" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from kernel_bench import FP8, FP8_MAX, gpu_ms, grouped_tile, relative_error, run_experiment  # noqa: E402

sys.path.insert(0, ".")
from sccsdxl import fused  # noqa: E402

BLOCK = 128  # GEGLU columns per program: the 1x128 blocks that share one fp8 scale
# (name, rows, model width, GEGLU width): the feed-forwards at 50 rows, 60 of the first shape and 10 of the second
SHAPES = [("1280 level: 51,200 rows, 1280 -> 2 x 5120 -> 1280", 51200, 1280, 5120),
          ("640 level: 204,800 rows, 640 -> 2 x 2560 -> 640", 204800, 640, 2560)]
TINY = [("tiny", 96, 256, 256), ("tiny, rows not a tile multiple", 70, 128, 384)]
INTERPRETER_CONFIG = {"BM": 16, "BK": 32, "GROUP_M": 2}  # Triton's CPU interpreter cannot autotune


def _configs() -> list:
    return [triton.Config({"BM": bm, "BK": bk, "GROUP_M": 8}, num_warps=warps, num_stages=stages)
            # two BM x 128 fp32 accumulators: compiled for sm_90 on a CPU (as group_norm_ptx.py does), BM 128 with
            # 8 warps took 222-232 registers and no spills, BM 64 with 4 warps spilled 28-72 bytes, BM 128 with 4
            # warps 1.7-2.1 kB (left out); BM 256 would not fit
            for bm, bk, warps, stages in [(128, 128, 8, 3), (128, 128, 8, 4), (128, 64, 8, 4), (64, 128, 4, 4),
                                          (64, 64, 4, 5)]]


@triton.autotune(configs=_configs(), key=["M", "K", "N", "FP8_OUT"])
@triton.jit
def _geglu_gemm_kernel(x_ptr, x_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr, out_scale_ptr, M, K, N,
                       FP8_OUT: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """out[m, j] = value * gelu(gate), value = x[m] . w[j] + bias[j] and gate = x[m] . w[N + j] + bias[N + j] with
    their row scales, for BM rows and 128 columns; with FP8_OUT in e4m3, each row's 128 values divided by their own
    scale, stored at out_scale[block, m] (so that its transpose is the (rows, blocks) scale tensor, rows
    contiguous)."""
    BN: tl.constexpr = 128
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = N // BN
    pid_m, pid_n = grouped_tile(pid, num_m, num_n, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < M
    x_at = x_ptr + rm.to(tl.int64)[:, None] * K + rk[None, :]
    value_at = w_ptr + rn.to(tl.int64)[None, :] * K + rk[:, None]  # (BK, BN): the weight rows, K contiguous
    gate_at = value_at + N.to(tl.int64) * K
    value = tl.zeros((BM, BN), dtype=tl.float32)
    gate = tl.zeros((BM, BN), dtype=tl.float32)
    for _ in range(0, K, BK):  # K is a multiple of BK (the launcher checks)
        x = tl.load(x_at, mask=m_ok[:, None], other=0.0)
        value = tl.dot(x, tl.load(value_at), value)
        gate = tl.dot(x, tl.load(gate_at), gate)
        x_at += BK
        value_at += BK
        gate_at += BK
    x_scale = tl.load(x_scale_ptr + rm, mask=m_ok, other=0.0)[:, None]
    value = value * x_scale * tl.load(w_scale_ptr + rn)[None, :] + tl.load(bias_ptr + rn).to(tl.float32)[None, :]
    gate = gate * x_scale * tl.load(w_scale_ptr + N + rn)[None, :] + tl.load(bias_ptr + N + rn).to(tl.float32)[None, :]
    out = value * (0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476)))
    at = rm.to(tl.int64)[:, None] * N + rn[None, :]
    if FP8_OUT:
        scale = tl.maximum(tl.max(tl.abs(out), axis=1) / 448.0, 1e-12)
        out = tl.clamp(out / scale[:, None], -448.0, 448.0)
        tl.store(out_scale_ptr + pid_n.to(tl.int64) * M + rm, scale, mask=m_ok)
    tl.store(out_ptr + at, out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None])


def geglu_gemm(x: torch.Tensor, x_scale: torch.Tensor, up: fused.Fp8RowWeight, fp8_out: bool,
               config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x (rows, K) e4m3 with (rows, 1) scales; ``up`` the GEGLU projection's fp8 weight (2n, K), value rows then gate
    rows, with its (1, 2n) scales and its bias -> GEGLU (rows, n): bf16, or e4m3 with (rows, n / 128) scales whose
    rows are contiguous."""
    rows, k = x.shape
    n = up.weight.shape[0] // 2
    if n % BLOCK or k % 128:
        raise ValueError(f"the GEGLU width ({n}) and the model width ({k}) must be multiples of 128")
    out = torch.empty(rows, n, device=x.device, dtype=FP8 if fp8_out else torch.bfloat16)
    scales = torch.empty(n // BLOCK, rows, device=x.device, dtype=torch.float32) if fp8_out else None
    grid = lambda meta: (triton.cdiv(rows, meta["BM"]) * (n // BLOCK),)  # noqa: E731
    kernel = _geglu_gemm_kernel if config is None else _geglu_gemm_kernel.fn
    kernel[grid](x, x_scale, up.weight, up.scale, up.bias, out, scales if fp8_out else x_scale, rows, k, n,
                 FP8_OUT=fp8_out, **(config or {}))
    return out, (scales.t() if fp8_out else None)


def quantize_row_blocks(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the kernel's FP8_OUT writes, rounded by torch: (rows, n) e4m3 with one scale per row of each 128-column
    block, (rows, n / 128)."""
    rows, cols = matrix.shape
    blocks = matrix.float().reshape(rows, cols // BLOCK, BLOCK)
    scale = (blocks.abs().amax(dim=2) / FP8_MAX).clamp(min=1e-12)
    return (blocks / scale[:, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).reshape(rows, cols), scale


def expand_blocks(scale: torch.Tensor, rows_per: int, cols_per: int) -> torch.Tensor:
    return scale.repeat_interleave(rows_per, dim=0).repeat_interleave(cols_per, dim=1)


class BlockWeight:
    """A linear's weight in e4m3 with one scale per 128x128 block, and its bias: the down projection of the
    blockwise path."""

    def __init__(self, linear: torch.nn.Linear):
        rows, cols = linear.weight.shape
        blocks = linear.weight.detach().float().reshape(rows // BLOCK, BLOCK, cols // BLOCK, BLOCK)
        self.scale = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12)  # (out / 128, in / 128)
        self.weight = (blocks / self.scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).reshape(rows, cols)
        self.bias = linear.bias.detach()
        self.bias_in_gemm = True  # until cuBLAS refuses it

    def matmul(self, values: torch.Tensor, scales: torch.Tensor, dequantized: bool = False) -> torch.Tensor:
        """(rows, in) e4m3 with (rows, in / 128) scales -> (rows, out) bf16: torch._scaled_mm's blockwise path, or
        the same product from dequantized values (the CPU, and the check that the GPU reads the scales as meant)."""
        if dequantized:
            x = values.float() * expand_blocks(scales, 1, BLOCK)
            w = self.weight.float() * expand_blocks(self.scale, BLOCK, BLOCK)
            return (x @ w.t() + self.bias.float()).to(torch.bfloat16)
        if self.bias_in_gemm:
            try:
                return torch._scaled_mm(values, self.weight.t(), scale_a=scales, scale_b=self.scale.t(),
                                        bias=self.bias, out_dtype=torch.bfloat16)
            except (RuntimeError, ValueError):  # not every scaling takes a bias: then it is added apart
                self.bias_in_gemm = False
        return torch._scaled_mm(values, self.weight.t(), scale_a=scales, scale_b=self.scale.t(),
                                out_dtype=torch.bfloat16) + self.bias


def linears(width: int, n: int, device: str) -> tuple[torch.nn.Linear, torch.nn.Linear]:
    """The feed-forward's GEGLU projection (width -> 2n) and down projection (n -> width), initialised as
    torch.nn.Linear does (diffusers' trained weights are not here; the error columns compare paths, nothing more)."""
    up, down = torch.nn.Linear(width, 2 * n, device=device), torch.nn.Linear(n, width, device=device)
    return up.to(torch.bfloat16).requires_grad_(False), down.to(torch.bfloat16).requires_grad_(False)


def reference(x: torch.Tensor, up: torch.nn.Linear, down: torch.nn.Linear) -> torch.Tensor:
    """The feed-forward in fp32: diffusers' GEGLU (value, gate halves, exact GELU), then the down projection."""
    value, gate = F.linear(x.float(), up.weight.float(), up.bias.float()).chunk(2, dim=-1)
    return F.linear(value * F.gelu(gate), down.weight.float(), down.bias.float())


def run_case(name: str, rows: int, width: int, n: int, device: str, timed: bool) -> str:
    x = F.layer_norm(torch.randn(rows, width, device=device), (width,)).to(torch.bfloat16)  # what a LayerNorm feeds
    up, down = linears(width, n, device)
    truth = reference(x, up, down)
    x_q, x_scale = fused.quantize_rows(x)
    up_q, down_q, down_blocks = fused.Fp8RowWeight(up), fused.Fp8RowWeight(down), BlockWeight(down)
    config = None if timed else INTERPRETER_CONFIG

    def kit() -> torch.Tensor:  # fused_geglu today: GEMM to bf16, the GEGLU + row kernel, row-scaled down GEMM
        hidden = up_q.matmul(x_q, x_scale, torch.bfloat16)
        return down_q.matmul(*fused.geglu_fp8_rows(hidden), torch.bfloat16)

    def fused_rows() -> torch.Tensor:  # the GEGLU inside the GEMM, bf16 out; then the same row quantization
        geglu, _ = geglu_gemm(x_q, x_scale, up_q, False, config)
        return down_q.matmul(*fused.fp8_rows(geglu), torch.bfloat16)

    def fused_blocks(dequantized: bool = False) -> torch.Tensor:  # fp8 blocks out, blockwise down GEMM
        return down_blocks.matmul(*geglu_gemm(x_q, x_scale, up_q, True, config), dequantized)

    geglu, _ = geglu_gemm(x_q, x_scale, up_q, False, config)
    dequantized_up = up_q.weight.float() * up_q.scale.reshape(-1, 1)
    value, gate = F.linear(x_q.float() * x_scale, dequantized_up, up.bias.float()).chunk(2, dim=-1)
    # the kernel's e4m3 blocks against torch's rounding of its bf16 output (Triton's interpreter rounds e4m3 wrongly
    # where rounding carries into the exponent, BENCHMARKS.md, session 10: on a CPU only the torch column is exact)
    _, kernel_scales = geglu_gemm(x_q, x_scale, up_q, True, config)
    torch_blocks, torch_scales = quantize_row_blocks(geglu)
    torch_rounded = down_blocks.matmul(torch_blocks, torch_scales, dequantized=True)
    scales_differ = float(((kernel_scales - torch_scales).abs() / torch_scales).max())
    row = (f"| {name} | {relative_error(geglu, value * F.gelu(gate)):.4f} | {scales_differ:.4f} | "
           f"{relative_error(kit(), truth):.4f} | {relative_error(fused_rows(), truth):.4f} | "
           f"{relative_error(fused_blocks(True), truth):.4f} | {relative_error(torch_rounded, truth):.4f} |")
    return row + timings(rows, width, n, x_q, x_scale, up_q, down_q, down_blocks, kit, fused_rows, fused_blocks) \
        if timed else row


def timings(rows, width, n, x_q, x_scale, up_q, down_q, down_blocks, kit, fused_rows, fused_blocks) -> str:
    """The timed columns of one shape's row (GPU only)."""
    try:  # cuBLAS's blockwise GEMM (CUDA 12.9 and later, Hopper): does it read the scales as meant?
        layout = f"{relative_error(fused_blocks(), fused_blocks(True)):.4f}"
        layout += "" if down_blocks.bias_in_gemm else " (bias added apart)"
    except (RuntimeError, ValueError) as error:  # torch raises either, by the check that fails
        layout = f"refused: {str(error).splitlines()[0][:200]}"
    flop_up, flop_down = 2 * rows * width * 2 * n, 2 * rows * n * width
    hidden = up_q.matmul(x_q, x_scale, torch.bfloat16)
    rows_q = fused.geglu_fp8_rows(hidden)
    ms = {"kit": gpu_ms(kit), "rows": gpu_ms(fused_rows),
          "up": gpu_ms(lambda: up_q.matmul(x_q, x_scale, torch.bfloat16)),
          "geglu": gpu_ms(lambda: fused.geglu_fp8_rows(hidden)),
          "down": gpu_ms(lambda: down_q.matmul(*rows_q, torch.bfloat16)),
          "fused bf16": gpu_ms(lambda: geglu_gemm(x_q, x_scale, up_q, False)),
          "fused fp8": gpu_ms(lambda: geglu_gemm(x_q, x_scale, up_q, True))}
    blocks = "- | - | -"
    if not layout.startswith("refused"):
        blocks_q = geglu_gemm(x_q, x_scale, up_q, True)
        ms["blocks"] = gpu_ms(fused_blocks)
        ms["down blocks"] = gpu_ms(lambda: down_blocks.matmul(*blocks_q))
        blocks = (f"{ms['blocks']:.3f} | {ms['kit'] / ms['blocks']:.2f}x | "
                  f"{ms['down blocks']:.3f} ({flop_down / ms['down blocks'] / 1e9:.0f})")
    best = _geglu_gemm_kernel.best_config
    return (f" {layout} | {ms['kit']:.3f} | {ms['rows']:.3f} | {ms['kit'] / ms['rows']:.2f}x | "
            f"{ms['up']:.3f} ({flop_up / ms['up'] / 1e9:.0f}) + {ms['geglu']:.3f} + "
            f"{ms['down']:.3f} ({flop_down / ms['down'] / 1e9:.0f}) | {ms['fused bf16']:.3f} "
            f"({flop_up / ms['fused bf16'] / 1e9:.0f}) / {ms['fused fp8']:.3f} "
            f"({flop_up / ms['fused fp8'] / 1e9:.0f}) | {blocks} | {best.kwargs} w{best.num_warps} "
            f"s{best.num_stages} |")


def main() -> None:
    run_experiment(run_case, TINY, SHAPES,
                   "fused GEGLU vs the same fp8 inputs in fp32 | its fp8 block scales vs torch's, largest "
                   "rel. difference | rel. error vs fp32: kit | fused, rows | fused, blocks | the same, the GEGLU "
                   "rounded to e4m3 by torch",
                   "blockwise: cuBLAS vs dequantized | ms: kit | fused, rows | kit / fused, rows | kit's pieces: "
                   "up GEMM (TFLOP/s) + GEGLU rows + down GEMM (TFLOP/s) | fused kernel, bf16 out (TFLOP/s) / fp8 "
                   "out (TFLOP/s) | fused, blocks | kit / fused, blocks | blockwise down GEMM (TFLOP/s) | "
                   "the fused kernel's chosen config")


if __name__ == "__main__":
    main()
