"""fp8_projections (sccsdxl.projections) against what fused_norms and fused_group_norms run without it, at the UNet's
two transformer levels at 100 rows (batch 50 with guidance): the transformer's input, its GroupNorm kernels then
proj_in in bf16 against the GroupNorm kernels writing e4m3 then proj_in in fp8; and its output, the blocks' last
residual add then proj_out in bf16 against that add writing fp8 rows then proj_out in fp8. Each path compiled as
compile_transformers runs it: ms, the speed-up, each path's error against fp32; then the GPU kernels of one call of
each. Run on a GPU node:
  python3 benchmarks/projections_h200.py
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from kernel_bench import gpu_ms, kernel_table, relative_error

sys.path.insert(0, ".")
from sccsdxl import group_norm as G  # noqa: E402
from sccsdxl.fused import Fp8RowWeight, add_fp8_rows  # noqa: E402
from sccsdxl.projections import normed_projection  # noqa: E402

ROWS = 100  # batch 50 with guidance
LEVELS = [("1280 level: 32x32 pixels, 1,280 channels", 1280, 32), ("640 level: 64x64 pixels, 640 channels", 640, 64)]


def run_level(name: str, channels: int, size: int) -> tuple[list[str], list[str]]:
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(32, channels, eps=1e-6).to("cuda", torch.bfloat16)
    proj_in, proj_out = (torch.nn.Linear(channels, channels).to("cuda", torch.bfloat16) for _ in range(2))
    fp8_in, fp8_out = Fp8RowWeight(proj_in), Fp8RowWeight(proj_out)
    x = torch.randn(ROWS, channels, size, size, device="cuda").to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    rows = ROWS * size * size
    stream, pending = (torch.randn(rows, channels, device="cuda").to(torch.bfloat16) for _ in range(2))

    def as_rows(t: torch.Tensor) -> torch.Tensor:
        return t.permute(0, 2, 3, 1).reshape(rows, channels)

    def input_bf16():
        return proj_in(as_rows(G.group_norm(x, norm)))

    def input_fp8():
        return normed_projection(x, norm, fp8_in)

    def output_bf16():
        return proj_out(stream + pending)

    def output_fp8():
        return fp8_out.matmul(*add_fp8_rows(pending, stream), torch.bfloat16)

    exact_in = F.linear(as_rows(F.group_norm(x.float(), 32, norm.weight.float(), norm.bias.float(), norm.eps)),
                        proj_in.weight.float(), proj_in.bias.float())
    exact_out = F.linear(stream.float() + pending.float(), proj_out.weight.float(), proj_out.bias.float())
    flop = 2 * rows * channels * channels
    table, kernels = [], []
    for part, exact, paths in (("input: GroupNorm + proj_in", exact_in, (input_bf16, input_fp8)),
                               ("output: residual add + proj_out", exact_out, (output_bf16, output_fp8))):
        times = []
        for label, path in zip(("bf16", "fp8"), paths):
            compiled = torch.compile(path, fullgraph=True, dynamic=False)  # static shapes, as the kit compiles
            with torch.no_grad():
                error = relative_error(compiled(), exact)
                times.append(gpu_ms(compiled))
                kernels.append(f"\n{name}, {part}, {label}: one call's GPU kernels\n{kernel_table(compiled, 8)}")
            table.append(f"| {name} | {part} | {label} | {times[-1]:.3f} | {flop / times[-1] / 1e9:.0f} | "
                         f"{error:.4f} |")
        table[-1] += f" {times[0] / times[1]:.2f}x |"
        table[-2] += " |"
    return table, kernels


def main() -> None:
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}\n")
    print("| level | part | path | ms | projection TFLOP/s (whole path's time) | rel. error against fp32 | "
          "bf16 / fp8 |\n|---|---|---|---|---|---|---|")
    profiles = []
    for level in LEVELS:
        table, kernels = run_level(*level)
        print("\n".join(table), flush=True)
        profiles += kernels
    print("\n".join(profiles))


if __name__ == "__main__":
    main()
