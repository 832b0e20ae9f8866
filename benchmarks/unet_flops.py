"""The SDXL UNet's arithmetic per forward by kind, from the layer shapes alone (the meta device: no weights, no GPU):
linears (and of them the transformer blocks' ones that fused_norms runs in fp8, all but the text key/value
projections), convolutions and attention, counted by torch.utils.flop_counter (2 per multiply-add). With the GPU ms
of a profiled batch (BENCHMARKS.md, session 16) it gives each kind's rate. Run from the repo root on any machine:
  python3 benchmarks/unet_flops.py [ROWS] [FP8_GEMM_MS] [ATTENTION_MS]    (defaults: 100 rows; no rates)
"""
import sys

import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, ".")
from sccsdxl.constants import NUM_INFERENCE_STEPS  # noqa: E402
from sccsdxl.pipeline import SDXL_UNET_CONFIG  # noqa: E402

TEXT_PROJECTIONS = ("attn2.to_k", "attn2.to_v")  # computed once per batch with text_kv_once, and in bf16


def unet_tflop(rows: int) -> dict[str, float]:
    """TFLOP of one UNet forward of ``rows`` rows, by kind."""
    block_linears: dict[str, float] = {}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG).to(torch.bfloat16)
        for name, linear in unet.named_modules():
            if isinstance(linear, torch.nn.Linear) and "transformer_blocks" in name \
                    and not name.endswith(TEXT_PROJECTIONS):
                linear.register_forward_hook(lambda m, args, out, name=name: block_linears.__setitem__(
                    name, 2 * out.numel() * m.in_features / 1e12))
        sample = torch.randn(rows, 4, 128, 128, dtype=torch.bfloat16)
        text = torch.randn(rows, 77, 2048, dtype=torch.bfloat16)
        added = {"text_embeds": torch.randn(rows, 1280, dtype=torch.bfloat16),
                 "time_ids": torch.randn(rows, 6, dtype=torch.bfloat16)}
        with FlopCounterMode(display=False) as counter:
            unet(sample, torch.ones(rows), text, added_cond_kwargs=added)
    ops = {str(op): flop / 1e12 for op, flop in counter.get_flop_counts()["Global"].items()}
    return {"linears": ops.get("aten.addmm", 0) + ops.get("aten.mm", 0),
            "transformer-block linears (fp8 with fused_norms)": sum(block_linears.values()),
            "convolutions": ops.get("aten.convolution", 0),
            # on the meta device the attention runs as batched matmuls (scores and weighted sum)
            "attention": ops.get("aten.bmm", 0) + ops.get("aten._scaled_dot_product_flash_attention", 0)}


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    times_ms = {"transformer-block linears (fp8 with fused_norms)": float(sys.argv[2]) if len(sys.argv) > 2 else None,
                "attention": float(sys.argv[3]) if len(sys.argv) > 3 else None}
    print(f"| UNet at {rows} rows | TFLOP per forward | PFLOP for {NUM_INFERENCE_STEPS} steps | GPU ms given | TFLOP/s |")
    print("|---|---|---|---|---|")
    for kind, tflop in unet_tflop(rows).items():
        total = tflop * NUM_INFERENCE_STEPS
        ms = times_ms.get(kind)
        rate = f"{total / ms * 1e3:.0f}" if ms else ""
        print(f"| {kind} | {tflop:.1f} | {total / 1e3:.2f} | {ms or ''} | {rate} |")


if __name__ == "__main__":
    main()
