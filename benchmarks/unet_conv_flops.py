"""The SDXL UNet's convolution arithmetic per forward, by layer, from the layer shapes alone (the meta device: no
weights, no GPU). Gives the floor the profiled convolution time is set against (BENCHMARKS.md, session 15): the total
over 20 steps at a given TFLOP/s. Run from the repo root on any machine:
  python3 benchmarks/unet_conv_flops.py [ROWS] [TFLOPS]      (defaults: 100 rows, batch 50 with guidance; 680)
"""
import sys

import torch
from diffusers import UNet2DConditionModel

sys.path.insert(0, ".")
from sccsdxl.constants import NUM_INFERENCE_STEPS  # noqa: E402
from sccsdxl.pipeline import SDXL_UNET_CONFIG  # noqa: E402


def conv_gflop(rows: int) -> dict[str, float]:
    """Each Conv2d's GFLOP in one UNet forward of ``rows`` rows (2 per multiply-add)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG).to(torch.bfloat16)
        flop: dict[str, float] = {}
        for name, conv in unet.named_modules():
            if isinstance(conv, torch.nn.Conv2d):
                conv.register_forward_hook(lambda m, args, out, name=name: flop.__setitem__(
                    name, 2 * out.numel() * m.in_channels * m.kernel_size[0] * m.kernel_size[1] / 1e9))
        sample = torch.randn(rows, 4, 128, 128, dtype=torch.bfloat16)
        text = torch.randn(rows, 77, 2048, dtype=torch.bfloat16)
        added = {"text_embeds": torch.randn(rows, 1280, dtype=torch.bfloat16),
                 "time_ids": torch.randn(rows, 6, dtype=torch.bfloat16)}
        unet(sample, torch.ones(rows), text, added_cond_kwargs=added)
    return flop


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    rate = float(sys.argv[2]) if len(sys.argv) > 2 else 680.0
    flop = conv_gflop(rows)
    upsamplers = sum(v for name, v in flop.items() if "upsamplers" in name)
    total = sum(flop.values())
    print(f"| UNet convolutions at {rows} rows | TFLOP per forward | s for {NUM_INFERENCE_STEPS} steps at {rate:.0f} TFLOP/s |")
    print("|---|---|---|")
    for label, value in (("all", total), ("the two upsamplers' 3x3 convolutions", upsamplers),
                         ("all but the upsamplers", total - upsamplers)):
        print(f"| {label} | {value / 1e3:.1f} | {value * NUM_INFERENCE_STEPS / rate / 1e3:.2f} |")


if __name__ == "__main__":
    main()
