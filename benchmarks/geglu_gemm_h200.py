"""Option fused_ffn_gemm against fused_geglu, at the UNet's two feed-forward shapes: does the GEGLU pay inside the up
projection's GEMM?

fused_geglu (what the fastest configuration runs): cuBLAS's fp8 GEMM writes the up projection's (rows, 2n) output in
bf16, sccsdxl.fused's kernel reads it back for GEGLU and one fp8 scale per row, and the down projection is a
row-scaled fp8 GEMM. fused_ffn_gemm (sccsdxl.ffn_gemm): one Triton kernel computes both halves of the up projection,
GEGLU and e4m3 with one scale per row of each 128 columns, and the down projection is cuBLAS's blockwise-scaled fp8
GEMM (1x128 activations, 128x128 weight blocks). A third path writes the kernel's GEGLU in bf16 and keeps the kit's
row quantization and row-scaled down GEMM (what is left if cuBLAS's blockwise GEMM is slow). The script checks the
paths against the feed-forward in fp32 and that cuBLAS reads the block scales as meant, then times each path and
each piece, with TFLOP/s, at 50 rows (batch 25 with guidance; 60 feed-forwards of the first shape and 10 of the
second per UNet forward). Session 12 found the kernel's GEMM at 813 TFLOP/s where cuBLAS's reaches 1,333, so a third
table times a persistent form of it, with TMA loads (one program per multiprocessor walking the tiles, so that the
compiler can overlap a tile's epilogue with the next tile's loads), each tile choice checked against the kernel.
Run on a Hopper GPU node:
  python3 benchmarks/geglu_gemm_h200.py   # or --interpret on a CPU: the persistent kernel on tiny shapes, correctness only
"""
from __future__ import annotations

import os
import sys

if "--interpret" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from kernel_bench import gpu_ms, relative_error  # noqa: E402

sys.path.insert(0, ".")
from sccsdxl import ffn_gemm as G  # noqa: E402
from sccsdxl import fused  # noqa: E402

if fused.triton is not None:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor

    from sccsdxl.ffn_gemm import geglu_epilogue, grouped_tile

    @triton.jit
    def _geglu_gemm_tma_kernel(x_desc, w_desc, x_scale_ptr, w_scale_ptr, bias_ptr, out_ptr, out_scale_ptr, M, K, N,
                               HAS_BIAS: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                               NUM_SMS: tl.constexpr, FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr):
        """sccsdxl.ffn_gemm's kernel with fp8 blocks, persistent: program p takes tiles p, p + NUM_SMS, ..., its
        row and weight tiles loaded by TMA (out-of-range rows read as zeros)."""
        BN: tl.constexpr = 128
        num_m = tl.cdiv(M, BM)
        num_n = N // BN
        # the epilogue counts its tiles apart from the loads, so that the pipeliner may run the loads ahead
        finished = tl.program_id(0) - NUM_SMS
        for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS, flatten=True):
            pid_m, pid_n = grouped_tile(tile, num_m, num_n, GROUP_M)
            value = tl.zeros((BM, BN), dtype=tl.float32)
            gate = tl.zeros((BM, BN), dtype=tl.float32)
            for k in range(0, K, BK):
                x = x_desc.load([pid_m * BM, k])
                value = tl.dot(x, w_desc.load([pid_n * BN, k]).T, value)
                gate = tl.dot(x, w_desc.load([N + pid_n * BN, k]).T, gate)
            finished += NUM_SMS
            pid_m, pid_n = grouped_tile(finished, num_m, num_n, GROUP_M)
            geglu_epilogue(value, gate, pid_m * BM + tl.arange(0, BM), pid_n * BN + tl.arange(0, BN), pid_n, M, N,
                           x_scale_ptr, w_scale_ptr, bias_ptr, out_ptr, out_scale_ptr, HAS_BIAS, True, FP8_MAX,
                           MIN_SCALE)

# (BM, BK, warps, stages) of the persistent kernel: 8 warps hold the two 128 x 128 accumulators without spilling
TMA_TILES = [(128, 128, 8, 3), (128, 128, 8, 4), (128, 64, 8, 4), (128, 64, 8, 6), (64, 128, 4, 4)]
TMA_ROWS: list[str] = []  # the third table's rows


def run_tma(values: torch.Tensor, scales: torch.Tensor, up: fused.Fp8RowWeight, tile: tuple[int, int, int, int],
            out: torch.Tensor, out_scales: torch.Tensor, sms: int | None = None) -> None:
    """The persistent kernel with one tile choice, on ``sms`` programs (the GPU's multiprocessors unless given)."""
    block_m, block_k, warps, stages = tile
    rows, k = values.shape
    n = up.weight.shape[0] // 2
    sms = sms or torch.cuda.get_device_properties(values.device).multi_processor_count
    tiles = triton.cdiv(rows, block_m) * (n // G.BLOCK)
    _geglu_gemm_tma_kernel[(min(sms, tiles),)](
        TensorDescriptor.from_tensor(values, [block_m, block_k]),
        TensorDescriptor.from_tensor(up.weight, [G.BLOCK, block_k]), scales, up.scale,
        up.scale if up.bias is None else up.bias, out, out_scales, rows, k, n, HAS_BIAS=up.bias is not None,
        BM=block_m, BK=block_k, GROUP_M=8, NUM_SMS=sms, FP8_MAX=fused.FP8_MAX, MIN_SCALE=fused.MIN_SCALE,
        num_warps=warps, num_stages=stages)


def tma_rows(name: str, values: torch.Tensor, scales: torch.Tensor, up: fused.Fp8RowWeight, flop: int,
             kit_ms: float) -> None:
    """Each persistent tile against the kit's kernel (autotuned): the same values and scales, and its time."""
    expected_values, expected_scales = G.geglu_fp8_blocks(values, scales, up)
    expected = G.dequantize_row_blocks(expected_values, expected_scales)
    for tile in TMA_TILES:
        out, out_scales = G._outputs(values, up.weight)
        try:
            run_tma(values, scales, up, tile, out, out_scales)
            ms = gpu_ms(lambda: run_tma(values, scales, up, tile, out, out_scales))
        except Exception as exc:  # noqa: BLE001 - a tile that does not fit must not lose the others
            TMA_ROWS.append(f"| {name} | {tile} | failed: {repr(exc)[:160]} | | |")
            continue
        error = relative_error(G.dequantize_row_blocks(out, out_scales.t()), expected)
        TMA_ROWS.append(f"| {name} | BM {tile[0]}, BK {tile[1]}, {tile[2]} warps, {tile[3]} stages | {error:.4f} | "
                        f"{ms:.3f} ({flop / ms / 1e9:.0f}) | {kit_ms / ms:.2f}x |")

# (name, rows, model width): the GEGLU width is four times the model width
TILES: list[str] = []  # the second table's rows: each tile of the kernel alone
SHAPES = [("1280 level: 51,200 rows, 1280 -> 2 x 5120 -> 1280", 51200, 1280),
          ("640 level: 204,800 rows, 640 -> 2 x 2560 -> 640", 204800, 640)]


def run_case(name: str, rows: int, width: int) -> str:
    from diffusers.models.attention import FeedForward

    torch.manual_seed(0)
    ff = FeedForward(width, mult=4, activation_fn="geglu").to("cuda", torch.bfloat16).eval()
    x = F.layer_norm(torch.randn(rows, width, device="cuda"), (width,)).to(torch.bfloat16)  # what a LayerNorm feeds
    value, gate = F.linear(x.float(), ff.net[0].proj.weight.float(), ff.net[0].proj.bias.float()).chunk(2, dim=-1)
    truth = F.linear(value * F.gelu(gate), ff.net[-1].weight.float(), ff.net[-1].bias.float())
    up, down = fused.Fp8RowWeight(ff.net[0].proj), fused.Fp8RowWeight(ff.net[-1])
    new = G.Fp8GegluGemmFeedForward(ff)
    values, scales = fused.fp8_rows(x)  # the norm kernel's output under fused_norms

    def kit() -> torch.Tensor:
        return down.matmul(*fused.geglu_fp8_rows(up.matmul(values, scales, torch.bfloat16)), torch.bfloat16)

    def fused_ffn() -> torch.Tensor:
        return new.from_fp8(values, scales, torch.bfloat16)

    geglu = torch.empty(rows, 4 * width, device="cuda", dtype=torch.bfloat16)

    def plain_geglu() -> torch.Tensor:  # the same kernel writing the GEGLU in bf16, no block scales
        G._launch(G._geglu_gemm_kernel, values, scales, new.up.weight, new.up.scale, new.up.bias, geglu, None)
        return geglu

    def fused_rows() -> torch.Tensor:  # if cuBLAS's blockwise GEMM is slow: the kit's row quantization and GEMM
        return down.matmul(*fused.fp8_rows(plain_geglu()), torch.bfloat16)

    blocks = G.geglu_fp8_blocks(values, scales, new.up)
    by_cublas = new.down.matmul(*blocks, torch.float32)
    dequantized = F.linear(G.dequantize_row_blocks(*blocks), new.down.dequantized(), new.down.bias.float())
    hidden = up.matmul(values, scales, torch.bfloat16)
    rows_q = fused.geglu_fp8_rows(hidden)
    ms = {"kit": gpu_ms(kit), "fused": gpu_ms(fused_ffn), "rows": gpu_ms(fused_rows),
          "plain": gpu_ms(plain_geglu), "fp8 rows": gpu_ms(lambda: fused.fp8_rows(geglu)),
          "up": gpu_ms(lambda: up.matmul(values, scales, torch.bfloat16)),
          "geglu": gpu_ms(lambda: fused.geglu_fp8_rows(hidden)),
          "down": gpu_ms(lambda: down.matmul(*rows_q, torch.bfloat16)),
          "kernel": gpu_ms(lambda: G.geglu_fp8_blocks(values, scales, new.up)),
          "down blocks": gpu_ms(lambda: new.down.matmul(*blocks, torch.bfloat16))}
    flop_up, flop_down = 2 * rows * width * 8 * width, 2 * rows * 4 * width * width

    def rate(flop: int, key: str) -> str:
        return f"{ms[key]:.3f} ({flop / ms[key] / 1e9:.0f})"

    tma_rows(name, values, scales, new.up, flop_up, ms["kernel"])
    best = G._geglu_gemm_kernel.best_config
    for config in G._configs():  # each tile the tuning chooses from, alone
        tile = (config.kwargs["BM"], config.kwargs["BK"], config.num_warps, config.num_stages)
        ms[tile] = gpu_ms(lambda: G.run_geglu_gemm_config(values, scales, new.up, tile[0], tile[1], tile[2],
                                                            num_stages=tile[3]))
        TILES.append(f"| {name} | BM {tile[0]}, BK {tile[1]}, {tile[2]} warps, {tile[3]} stages | "
                     f"{rate(flop_up, tile)} |")
    return (f"| {name} | {relative_error(kit(), truth):.4f} | {relative_error(fused_ffn(), truth):.4f} | "
            f"{relative_error(fused_rows(), truth):.4f} | "
            f"{relative_error(by_cublas, dequantized):.4f}{'' if G._bias_in_gemm() else ' (bias added apart)'} | "
            f"{ms['kit']:.3f} | {ms['fused']:.3f} ({ms['kit'] / ms['fused']:.2f}x) | {ms['rows']:.3f} "
            f"({ms['kit'] / ms['rows']:.2f}x) | {rate(flop_up, 'up')} + {ms['geglu']:.3f} + "
            f"{rate(flop_down, 'down')} | {rate(flop_up, 'kernel')} + {rate(flop_down, 'down blocks')} | "
            f"{rate(flop_up, 'plain')} + {ms['fp8 rows']:.3f} | {best.kwargs} w{best.num_warps} "
            f"s{best.num_stages} |")


def interpret() -> None:
    """Triton's CPU interpreter: the persistent kernel on tiny shapes with partial row tiles and several tiles per
    program (3 programs), against the kernel's definition; fp32 output (the interpreter's own e4m3 cast is not
    exact). Rows: name | max error / max | scales equal."""
    from diffusers.models.attention import FeedForward

    torch.manual_seed(0)
    for rows, width, tile in ((70, 128, (64, 64, 4, 2)), (40, 256, (32, 128, 4, 2))):
        up = G.Fp8GegluGemmFeedForward(FeedForward(width, mult=4, activation_fn="geglu").to(torch.bfloat16)).up
        values, scales = fused.quantize_rows(torch.randn(rows, width).to(torch.bfloat16))
        geglu = G.geglu_reference(values, scales, up)
        out, out_scales = G._outputs(values, up.weight, torch.float32)
        run_tma(values, scales, up, tile, out, out_scales, sms=3)
        error = (G.dequantize_row_blocks(out, out_scales.t()) - geglu).abs().max() / geglu.abs().max()
        same = torch.allclose(out_scales.t(), G.quantize_row_blocks(geglu)[1], rtol=1e-5)
        print(f"| tiny {rows} rows, {width} wide, tile {tile} | {float(error):.2e} | {same} |")


def main() -> None:
    if "--interpret" in sys.argv:
        return interpret()
    if not G.blockwise_gemm_available():
        sys.exit("fused_ffn_gemm needs a Hopper GPU, Triton and torch._scaled_mm's blockwise fp8 GEMM (cuBLAS 12.9+)")
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, triton {triton.__version__}\n")
    header = ("| shape | rel. error vs fp32: fused_geglu | fused_ffn_gemm | the kernel in bf16, then rows | "
              "cuBLAS blockwise vs dequantized | ms: fused_geglu | fused_ffn_gemm (speedup) | the kernel in bf16, "
              "then the row quantization and row-scaled down GEMM (speedup) | fused_geglu's pieces: up GEMM "
              "(TFLOP/s) + GEGLU kernel + down GEMM (TFLOP/s) | fused_ffn_gemm's: kernel (TFLOP/s) + blockwise "
              "down GEMM (TFLOP/s) | the kernel in bf16 (TFLOP/s) + row quantization | the kernel's chosen tile "
              "(fp8 blocks) |")
    print(header + "\n|" + "---|" * (header.count("|") - 1))
    for shape in SHAPES:
        with torch.inference_mode():  # as the pipeline runs them
            print(run_case(*shape), flush=True)
    print("\n| shape | the kernel's tile | ms (TFLOP/s) |\n|---|---|---|\n" + "\n".join(TILES))
    print("\n| shape | the persistent TMA kernel's tile | rel. difference from the kernel | ms (TFLOP/s) | "
          "vs the kernel |\n|---|---|---|---|---|\n" + "\n".join(TMA_ROWS))


if __name__ == "__main__":
    main()
