"""The VAE decoder's one attention, in its mid block: 128x128 latent pixels (16,384 tokens) and a single head 512 wide.

cuDNN's and flash attention do not take a head that wide, so PyTorch runs its memory-efficient kernel: 4.5 ms per
image of the decoder's 26.3 with vae_group_norms on the H200 (BENCHMARKS.md, session 12), about 125 TFLOP/s. Here
that call (under the kit's sdpa=cudnn preference, as the decoder runs it) against the same attention as
sccsdxl.vae_attention.attention_by_gemms computes it, two batched GEMMs and a softmax, a few images at a time: the scores come out of the first GEMM in fp32 (as flash attention keeps
them), the softmax reads them in fp32 and writes bf16 probabilities, which the second GEMM multiplies by the values.
Eager and compiled. Each is checked against the attention in fp32 on two images, then timed at 50 images (what a
batch of 50 decodes). Run from the repo root on a GPU node:
  python3 benchmarks/vae_attention_h200.py
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from kernel_bench import gpu_ms, relative_error

sys.path.insert(0, ".")
from sccsdxl.quant import sdpa_context  # noqa: E402
from sccsdxl.vae_attention import attention_by_gemms  # noqa: E402

IMAGES, TOKENS, WIDTH = 50, 128 * 128, 512
FLOP = 4 * IMAGES * TOKENS * TOKENS * WIDTH  # two GEMMs of 2 * tokens^2 * width each, per image


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """As diffusers calls it: (images, 1 head, tokens, width); 3-d inputs would go to the math kernel."""
    with sdpa_context("cudnn"):
        return F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]


def main() -> None:
    torch.manual_seed(0)
    # a GroupNorm's output through a linear: unit-scale rows, as the decoder's q, k, v
    q, k, v = (torch.randn(IMAGES, TOKENS, WIDTH, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    truth = F.scaled_dot_product_attention(q[:2].float(), k[:2].float(), v[:2].float())
    variants = {"memory-efficient SDPA (what runs now)": sdpa}
    for chunk in (2, 5, 10):
        variants[f"two GEMMs + softmax, {chunk} images at a time"] = \
            lambda q, k, v, c=chunk: attention_by_gemms(q, k, v, WIDTH ** -0.5, c)
    variants["the same compiled, 5 at a time"] = torch.compile(lambda q, k, v: attention_by_gemms(q, k, v,
                                                                                                 WIDTH ** -0.5, 5))
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}; {IMAGES} images, {TOKENS} tokens, "
          f"one head {WIDTH} wide\n")
    print("| attention | rel. error vs fp32 (2 images) | ms per 50 images | ms per image | TFLOP/s | peak GiB |")
    print("|---|---|---|---|---|---|")
    for name, fn in variants.items():
        try:
            with torch.inference_mode():
                error = relative_error(fn(q[:2], k[:2], v[:2]), truth)
                torch.cuda.reset_peak_memory_stats()
                ms = gpu_ms(lambda: fn(q, k, v), reps=5)
        except Exception as exc:  # noqa: BLE001 - one variant that cannot run must not lose the others
            print(f"| {name} | failed: {repr(exc)[:200]} | | | | |", flush=True)
            continue
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"| {name} | {error:.4f} | {ms:.1f} | {ms / IMAGES:.2f} | {FLOP / ms / 1e9:.0f} | {peak:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
