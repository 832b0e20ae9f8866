"""SDXL's five 2x upsamplers alone: diffusers' Upsample2D (nearest upsample, then a 3x3 convolution) against
sccsdxl.upsample.FoldedUpsample in its forms: option folded_upsamplers (one 2x2 convolution with four times the
outputs on the small image, then the phases interleaved by one strided copy), the same with session 13's interleave
(slices and stacks, which inductor compiled into intermediate buffers; kept here for the comparison), and option
transposed_upsamplers (the same taps as one stride-2 transposed convolution), each compiled as the kit compiles it
(one region), bf16, channels_last.

The UNet's two at 50 rows (batch 25 with guidance), the VAE decoder's three at 10 images. Each is checked against
the original in fp32 on the same weights and input, then its first (compiling) call and its time are measured;
TFLOP/s counts the original's arithmetic (a 3x3 convolution of the large image), so the folded forms' figures are
effective rates. Run from the repo root:
  python3 benchmarks/folded_upsample_h200.py
"""
from __future__ import annotations

import copy
import sys
import time

import torch
from diffusers.models.upsampling import Upsample2D
from kernel_bench import gpu_ms, relative_error

sys.path.insert(0, ".")
from sccsdxl.quant import static_graphs  # noqa: E402
from sccsdxl.upsample import FoldedUpsample  # noqa: E402


class StackedInterleave(FoldedUpsample):
    """folded_upsamplers as measured in session 13: the phases interleaved by slices and stacks."""

    def forward(self, hidden_states, output_size=None, *args, **kwargs):
        height, width = hidden_states.shape[-2:]
        phases = torch.nn.functional.conv2d(hidden_states, self.weight, self.bias, padding=1)
        images, channels = phases.shape[0], phases.shape[1] // 4
        split = phases.view(images, 2, 2, channels, height + 1, width + 1)
        rows = [torch.stack([split[:, a, b, :, a:a + height, b:b + width] for b in (0, 1)], dim=-1) for a in (0, 1)]
        out = torch.stack(rows, dim=-3).reshape(images, channels, 2 * height, 2 * width)
        return out.contiguous(memory_format=torch.channels_last)

# (name, images, channels, input side)
SHAPES = [("UNet, 1280 ch, 32x32 -> 64x64", 50, 1280, 32), ("UNet, 640 ch, 64x64 -> 128x128", 50, 640, 64),
          ("VAE, 512 ch, 128x128 -> 256x256", 10, 512, 128), ("VAE, 512 ch, 256x256 -> 512x512", 10, 512, 256),
          ("VAE, 256 ch, 512x512 -> 1024x1024", 10, 256, 512)]


def first_call_s(module, x) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    module(x)
    torch.cuda.synchronize()
    return time.perf_counter() - started


def row(name: str, images: int, channels: int, side: int) -> str:
    torch.manual_seed(0)
    original = Upsample2D(channels, use_conv=True, out_channels=channels).cuda()
    x = torch.randn(images, channels, side, side, device="cuda")
    with torch.no_grad():
        reference = original(x[:2])
        bf16 = original.to(torch.bfloat16).to(memory_format=torch.channels_last)
        modules = [bf16, StackedInterleave(copy.deepcopy(bf16)), FoldedUpsample(copy.deepcopy(bf16)),
                   FoldedUpsample(copy.deepcopy(bf16), transposed=True)]
        x = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        errors = [relative_error(m(x[:2]), reference) for m in modules]
        for module in modules:
            module.compile(fullgraph=True)
        compile_s = [first_call_s(m, x) for m in modules]
        outs = [m(x) for m in modules]
        layouts = [out.is_contiguous(memory_format=torch.channels_last) for out in outs[1:]]
        differences = [relative_error(out, outs[0]) for out in outs[1:]]
        del outs
        ms = [gpu_ms(lambda m=m: m(x)) for m in modules]
    flop = 2 * images * (2 * side) ** 2 * channels * channels * 9
    timed = " | ".join(f"{t:.3f} ({flop / t / 1e9:.0f})" for t in ms)
    return (f"| {name} | {' / '.join(f'{e:.4f}' for e in errors)} | {' / '.join(f'{d:.4f}' for d in differences)} "
            f"| {' / '.join(str(v) for v in layouts)} | {' / '.join(f'{c:.1f}' for c in compile_s)} | {timed} "
            f"| {' / '.join(f'{ms[0] / t:.2f}x' for t in ms[1:])} |")


def main() -> None:
    static_graphs()  # one graph per shape, as the kit compiles (automatic dynamic shapes off)
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}\n")
    forms = "stacked (session 13) / folded / transposed"
    print(f"| upsampler | rel. error vs fp32: original / {forms} | vs original, bf16: {forms} "
          f"| channels_last out: {forms} | first call s: original / {forms} | ms: original (TFLOP/s) "
          f"| stacked (effective) | folded (effective) | transposed (effective) | speedup: {forms} |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    for shape in SHAPES:
        print(row(*shape), flush=True)


if __name__ == "__main__":
    main()
