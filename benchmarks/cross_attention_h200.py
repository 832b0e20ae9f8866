"""sccsdxl.cross_attention's kernel (fused_norms' blocks run it unless SCCSDXL_FUSED_CROSS_ATTENTION=0) against what
they run without it: cuDNN's attention (PyTorch SDPA), then fp8_rows quantizing its output per row for the output
projection.

At the UNet's two transformer levels at 100 rows (batch 50 with guidance), queries from the q projection and the
text's fused k/v projection (77 tokens): ms of each path compiled as the blocks run it, the bytes the fused kernel
must move (queries read, e4m3 written) per second, each path's error against the fp32 attention, and each tuning
choice of the kernel; then the GPU kernels of one call of each compiled path (session 22 found the fused path,
compiled as a triton_op, 2.6x slower than its kernel alone: the kernel's own time; it is an opaque op since). Run on a
GPU node:
  python3 benchmarks/cross_attention_h200.py
"""
from __future__ import annotations

import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernel_bench import gpu_ms, kernel_table, relative_error

sys.path.insert(0, ".")
from sccsdxl import cross_attention as X  # noqa: E402
from sccsdxl.fused import FP8, cross_attend, fp8_rows  # noqa: E402

ROWS = 100  # batch 50 with guidance
SHAPES = [("1280 level: 1,024 tokens, 20 heads", 1024, 20), ("640 level: 4,096 tokens, 10 heads", 4096, 10)]


def unfused(query: torch.Tensor, kv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """As Fp8TransformerBlock.step runs it without the switch."""
    return fp8_rows(cross_attend(query, kv, ROWS, heads))


def run_case(name: str, tokens: int, heads: int) -> list[str]:
    torch.manual_seed(0)
    width = heads * 64
    query = torch.randn(ROWS * tokens, width, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(ROWS * 77, 2 * width, device="cuda", dtype=torch.bfloat16)
    exact = cross_attend(query.float(), kv.float(), ROWS, heads)
    moved = query.numel() * 3  # bf16 queries read, e4m3 written
    rows, kernels = [], {}
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        # static shapes, as the kit compiles its blocks: a recompile with dynamic ones fails to launch the kernel
        for label, path, args in (("cuDNN attention + fp8_rows", torch.compile(unfused, dynamic=False),
                                   (query, kv, heads)),
                                  ("sccsdxl.cross_attention, tuned",
                                   torch.compile(X.cross_attention_fp8_rows, dynamic=False), (query, kv, ROWS, heads))):
            values, scales = path(*args)
            ms = gpu_ms(lambda: path(*args))
            error = relative_error(values.float() * scales, exact)
            rows.append(f"| {name} | {label} | {ms:.3f} | {moved / ms / 1e6:.0f} | {error:.4f} |")
            kernels[label] = kernel_table(lambda: path(*args))
    scale = X.image_scales(kv, ROWS)
    out = torch.empty(query.shape, device="cuda", dtype=FP8)
    for config in X._cross_attention_fp8_kernel.configs:
        bm, blocks, warps, stages = config.kwargs["BM"], config.kwargs["BLOCKS"], config.num_warps, config.num_stages
        ms = gpu_ms(lambda: X.run_config(query, kv, 1.0 / scale, out, ROWS, heads, bm, blocks, warps, stages))
        error = relative_error(out.float() * scale.repeat_interleave(tokens)[:, None], exact)
        rows.append(f"| {name} | kernel alone, {blocks} x {bm} tokens, {warps} warps, {stages} stages | {ms:.3f} | "
                    f"{moved / ms / 1e6:.0f} | {error:.4f} |")
    return rows + [f"\n{name}, {label}: one call's GPU kernels\n{table}" for label, table in kernels.items()]


def main() -> None:
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}\n")
    print("| shape | path | ms | GB/s (queries read, e4m3 written) | rel. error against fp32 attention |")
    print("|---|---|---|---|---|")
    for shape in SHAPES:
        print("\n".join(run_case(*shape)), flush=True)


if __name__ == "__main__":
    main()
