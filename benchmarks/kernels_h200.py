"""BENCHMARKS.md "Where the UNet's time goes": the kernels of one SDXL denoising step at their real shapes.

Measures, on one GPU with random data (kernel speed does not depend on values):
- the UNet's linear layers in bf16 and fp8 (tensor-wise and row-wise scales, with and without the dynamic
  activation quantization that torchao's fp8 option adds, compiled as it runs inside compiled blocks),
- attention at the UNet's shapes with each SDPA backend,
- 3x3 convolutions and GroupNorm+SiLU in NCHW and channels_last,
- the whole UNet and the VAE decoder in eager bf16 with either memory layout and SDPA backend.
Run from the repo root:  python3 benchmarks/kernels_h200.py RESULT.json [ROWS]
ROWS is the UNet batch (2 rows per image; default 20 = 10 images per call).
"""
from __future__ import annotations

import json
import sys
import time

import torch
import torch.nn.functional as F
from triton.testing import do_bench

RESULTS: list[dict] = []
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


def record(group: str, name: str, ms: float, flop: float = 0.0, **extra) -> None:
    row = {"group": group, "name": name, "ms": round(ms, 4), **extra}
    if flop:
        row["tflops"] = round(flop / ms / 1e9, 1)
    RESULTS.append(row)
    print(json.dumps(row), flush=True)


def bench(fn, reps: int = 50) -> float:
    return do_bench(fn, warmup=10, rep=reps)


def linear_shapes(rows: int) -> dict[str, tuple[int, int, int]]:
    """(M, K, N) of the UNet's linears: 1280-wide blocks at 32x32 tokens, 640-wide at 64x64."""
    m32, m64 = rows * 1024, rows * 4096
    return {"1280 q/k/v/o": (m32, 1280, 1280), "1280 fused qkv": (m32, 1280, 3840),
            "1280 ff1 (GEGLU)": (m32, 1280, 10240), "1280 ff2": (m32, 5120, 1280),
            "1280 cross k/v": (rows * 77, 2048, 1280),
            "640 q/k/v/o": (m64, 640, 640), "640 ff1 (GEGLU)": (m64, 640, 5120), "640 ff2": (m64, 2560, 640)}


def rowwise_dynamic(x, wq, w_scale):
    """What torchao's per-row fp8 linear does per call: quantize the activation by row, then a scaled matmul."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / FP8_MAX
    xq = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return torch._scaled_mm(xq, wq, scale_a=scale, scale_b=w_scale, out_dtype=torch.bfloat16, use_fast_accum=True)


def tensorwise_dynamic(x, wq, w_scale):
    amax = x.abs().amax().float().clamp(min=1e-12)
    scale = amax / FP8_MAX
    xq = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return torch._scaled_mm(xq, wq, scale_a=scale, scale_b=w_scale, out_dtype=torch.bfloat16, use_fast_accum=True)


def linears(rows: int) -> None:
    compiled_row = torch.compile(rowwise_dynamic, dynamic=False)
    compiled_tensor = torch.compile(tensorwise_dynamic, dynamic=False)
    one = torch.ones((), device="cuda")
    for name, (m, k, n) in linear_shapes(rows).items():
        flop = 2.0 * m * k * n
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        record("linear", f"{name} bf16", bench(lambda: F.linear(x, w)), flop, shape=[m, k, n])
        xq, wq = x.to(FP8), w.to(FP8).t()
        record("linear", f"{name} fp8 tensorwise mm", bench(
            lambda: torch._scaled_mm(xq, wq, scale_a=one, scale_b=one, out_dtype=torch.bfloat16, use_fast_accum=True)),
            flop)
        row_a = torch.ones(m, 1, device="cuda")
        row_b = torch.ones(1, n, device="cuda")
        try:
            record("linear", f"{name} fp8 rowwise mm", bench(
                lambda: torch._scaled_mm(xq, wq, scale_a=row_a, scale_b=row_b, out_dtype=torch.bfloat16,
                                         use_fast_accum=True)), flop)
            record("linear", f"{name} fp8 rowwise + dynamic quant (compiled)",
                   bench(lambda: compiled_row(x, wq, row_b)), flop)
        except Exception as exc:  # noqa: BLE001
            record("linear", f"{name} fp8 rowwise failed: {exc}"[:200], 0.0)
        record("linear", f"{name} fp8 tensorwise + dynamic quant (compiled)",
               bench(lambda: compiled_tensor(x, wq, one)), flop)
        del x, w, xq, wq


def attention(rows: int) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    shapes = {"self 1280@32x32": (20, 1024, 1024), "self 640@64x64": (10, 4096, 4096),
              "cross 1280@32x32": (20, 1024, 77), "cross 640@64x64": (10, 4096, 77)}
    for name, (heads, lq, lk) in shapes.items():
        q = torch.randn(rows, heads, lq, 64, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(rows, heads, lk, 64, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        flop = 4.0 * rows * heads * lq * lk * 64
        for backend in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
            try:
                with sdpa_kernel(getattr(SDPBackend, backend)):
                    ms = bench(lambda: F.scaled_dot_product_attention(q, k, v))
                record("attention", f"{name} {backend}", ms, flop)
            except Exception as exc:  # noqa: BLE001
                record("attention", f"{name} {backend} failed: {str(exc).splitlines()[0]}"[:200], 0.0)


def convs(rows: int) -> None:
    for c, size in ((320, 128), (640, 64), (1280, 32)):
        x = torch.randn(rows // 2 * 2, c, size, size, device="cuda", dtype=torch.bfloat16)
        conv = torch.nn.Conv2d(c, c, 3, padding=1, device="cuda", dtype=torch.bfloat16)
        norm = torch.nn.GroupNorm(32, c, device="cuda", dtype=torch.bfloat16)
        flop = 2.0 * x.numel() * c * 9
        for layout in ("nchw", "channels_last"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            xs, cs = x.to(memory_format=fmt), conv.to(memory_format=fmt)
            with torch.inference_mode():
                record("conv", f"conv3x3 C{c} {size}x{size} {layout}", bench(lambda: cs(xs)), flop)
                record("norm", f"GroupNorm+SiLU C{c} {size}x{size} {layout}", bench(lambda: F.silu(norm(xs))))
        del x


def whole_models(rows: int) -> None:
    sys.path.insert(0, ".")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from sccsdxl.pipeline import SDXL_UNET_CONFIG, SDXL_VAE_CONFIG

    flop_per_row = 6.761e12
    with torch.device("cuda"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG).to(torch.bfloat16).eval()
    sample = torch.randn(rows, 4, 128, 128, device="cuda", dtype=torch.bfloat16)
    text = torch.randn(rows, 77, 2048, device="cuda", dtype=torch.bfloat16)
    added = {"text_embeds": torch.randn(rows, 1280, device="cuda", dtype=torch.bfloat16),
             "time_ids": torch.randn(rows, 6, device="cuda", dtype=torch.bfloat16)}
    t = torch.tensor(500.0, device="cuda")

    def step():
        return unet(sample, t, encoder_hidden_states=text, added_cond_kwargs=added, return_dict=False)[0]

    for layout in ("nchw", "channels_last"):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        unet.to(memory_format=fmt)
        for backend in ("FLASH_ATTENTION", "CUDNN_ATTENTION"):
            with torch.inference_mode(), sdpa_kernel([getattr(SDPBackend, backend), SDPBackend.EFFICIENT_ATTENTION]):
                ms = do_bench(step, warmup=2, rep=3000)
            record("unet", f"UNet eager bf16 {layout} {backend} (B={rows})", ms, flop_per_row * rows)
    del unet, sample, text
    torch.cuda.empty_cache()

    with torch.device("cuda"):
        vae = AutoencoderKL(**SDXL_VAE_CONFIG).to(torch.bfloat16).eval()
    images = 4
    latents = torch.randn(images, 4, 128, 128, device="cuda", dtype=torch.bfloat16)
    for layout in ("nchw", "channels_last"):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        vae.to(memory_format=fmt)
        with torch.inference_mode():
            ms = do_bench(lambda: vae.decode(latents, return_dict=False)[0], warmup=2, rep=2000)
        record("vae", f"VAE decode bf16 {layout} ({images} images)", ms, 10.470e12 * images, per_image_ms=ms / images)


def main() -> None:
    out = sys.argv[1]
    rows = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    started = time.time()
    header = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows,
              "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(header), flush=True)
    for part in (linears, attention, convs, whole_models):
        try:
            part(rows)
        except Exception as exc:  # noqa: BLE001 - one broken part must not lose the others
            record(part.__name__, f"failed: {exc!r}"[:300], 0.0)
        torch.cuda.empty_cache()
        with open(out, "w") as handle:
            json.dump({**header, "seconds": round(time.time() - started), "results": RESULTS}, handle, indent=1)


if __name__ == "__main__":
    main()
