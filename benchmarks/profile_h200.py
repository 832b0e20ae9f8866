"""The UNet and the VAE decoder as the kit builds them (BENCHMARKS.md "Batch 25 and 50, larger compiled regions"
and "Batch 50, a fused GEGLU + fp8 kernel").

Each configuration is built by `sccsdxl.quant.apply_optimizations` on a fresh synthetic (full-size, random
weights) bf16 pipeline, exactly as a run builds it, with dynamo reset and its own inductor cache directory so
it compiles cold; then its first call (compilation) is timed, then the median of several calls (host clock
with the GPU drained), then one call under torch.profiler whose GPU time is summed by kernel kind (GEMM
bf16/fp8, convolution, attention, anything named "norm", other Triton, elementwise), with the top kernels' totals
and call counts. It guides which option to build next; throughput figures come only from loadgen runs.

Run from the repo root on a GPU node:
  python3 benchmarks/profile_h200.py OUT_DIR ROWS VAE_IMAGES SPEC [SPEC ...]
SPEC is  unet:<optimizations>,  vae:<optimizations>  or  pipe:<optimizations>, e.g.
"unet:fuse_qkv,compile,fp8,sdpa=cudnn". ROWS is the UNet batch (2 rows per image); VAE_IMAGES is the decoder's
batch, and for pipe: the number of captions of one whole generate call (text encoders, 20 UNet steps, decode,
copy to the host, as a loadgen batch runs), whose GPU-busy time is set against its wall time to show how long the
GPU waited on the host. CACHE_DIR (env) is every configuration's compile cache instead of a new directory each:
CACHE_DIR=bench-runs/rep/cache after `repeat_h200.py ... bench-runs/rep ...` in the same call starts its
configurations warm. LIMIT (env, default 240) bounds each first call in seconds, at best
effort: an alarm that lands inside inductor's parallel kernel compilation is caught there and the call goes
on. SIZE=tiny DEVICE=cpu runs the same code on the tiny pipeline (a smoke test; its times mean nothing).
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, ".")
from sccsdxl.data import sample_set  # noqa: E402
from sccsdxl.power import PowerMonitor, visible_gpu_uuids  # noqa: E402
from sccsdxl.pipeline import build_random_pipeline, free_gpu_memory, make_runner  # noqa: E402
from sccsdxl.quant import apply_optimizations, own_inductor_settings, parse_optimizations, sdpa_context  # noqa: E402

KINDS = (  # first match wins; names of cuBLAS, CUTLASS, cuDNN, flash and Triton kernels
    ("fused geglu+fp8", ("geglu_fp8",)),  # sccsdxl.fused's kernel (its name has "fp8" in it)
    ("norm+fp8 rows", ("_layer_norm_fp8_rows_kernel",)),  # sccsdxl.fused's LayerNorm kernel (option fused_norms)
    ("fp8 rows", ("_fp8_rows_kernel",)),  # sccsdxl.fused's plain row kernel (option fp8_attn_out)
    # sccsdxl.group_norm's three kernels (option fused_group_norms), and the e4m3 framed write (fp8_convs)
    ("group norm kernels", ("_slice_statistics_kernel", "_group_statistics_kernel", "_normalize_kernel",
                            "_normalize_framed_kernel")),
    ("conv fp8", ("_shifted_conv_kernel",)),  # sccsdxl.fp8_conv's kernel (option fp8_convs)
    ("attention", ("fmha", "flash", "sdpa", "attention", "attn")),
    ("gemm fp8", ("f8", "e4m3", "fp8", "qgemm", "qqtst")),  # nvjet_*_qqtst_*: cuBLAS fp8
    ("conv", ("conv", "fprop", "implicit", "winograd", "dgrad", "nhwc", "nchw")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "sm90")),
    ("norm", ("norm", "welford")),
    ("triton fused", ("triton",)),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "copy", "cat", "reduce")),
)


SIZE, DEVICE = os.environ.get("SIZE", "full"), os.environ.get("DEVICE", "cuda")  # tiny/cpu: smoke test only
LATENT = 128 if SIZE == "full" else 32


class TimeUp(Exception):
    pass


def _alarm(signum, frame):
    raise TimeUp()


def kind_of(name: str) -> str:
    """Inductor's own kernels (triton_poi/per/red_*) are named by the ops they fused: one named for a convolution
    and a GroupNorm holds the norm around cuDNN's convolution, not the convolution, so they are kinds of their own."""
    low = name.lower()
    if low.startswith("triton_"):
        return "norm" if "norm" in low else "triton fused"
    for kind, needles in KINDS:
        if any(n in low for n in needles):
            return kind
    return "other"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def call_ms(fn, reps: int) -> list[float]:
    """Wall time per call with the GPU drained before and after (calls here take hundreds of ms)."""
    times = []
    for _ in range(reps):
        sync()
        started = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - started) * 1000)
    return times


@contextlib.contextmanager
def gpu_samples(result: dict, period_ms: int = 200):
    """The GPU's energy, power and SM clock while the body runs (``sccsdxl.power``, through NVML; cuda only): a
    clock held under its maximum under sustained load slows every kernel against its figure measured alone, and
    ``power_capped_share`` says whether the power limit is what held it."""
    if DEVICE != "cuda":
        yield
        return
    with PowerMonitor(visible_gpu_uuids()[:1], period_s=period_ms / 1000) as watch:
        yield
    result["gpu_samples"] = watch.summary()


def profile(fn) -> dict:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA if DEVICE == "cuda" else ProfilerActivity.CPU]) as prof:
        sync()
        started = time.perf_counter()
        fn()
        sync()
        wall_ms = (time.perf_counter() - started) * 1000
    kernels: dict[str, float] = {}
    calls: dict[str, int] = {}
    for event in prof.events():
        if DEVICE != "cuda" or event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name] = kernels.get(event.name, 0.0) + (event.self_device_time_total or event.time_range.elapsed_us()) / 1000.0
            calls[event.name] = calls.get(event.name, 0) + 1
    kinds: dict[str, float] = {}
    for name, ms in kernels.items():
        kind = kind_of(name)
        kinds[kind] = kinds.get(kind, 0.0) + ms
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:40]
    by_kind = {k: round(v, 2) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}
    return {"wall_ms": round(wall_ms, 2), "gpu_ms": round(sum(kernels.values()), 2), "by_kind": by_kind,
            "top_kernels": [[name[:140], round(ms, 3), calls[name]] for name, ms in top]}  # name, total ms, calls


def unet_call(pipe, rows: int):
    unet = pipe.unet
    dtype = unet.dtype
    config = unet.config
    sample = torch.randn(rows, 4, LATENT, LATENT, device=DEVICE, dtype=dtype)
    text = torch.randn(rows, 77, config.cross_attention_dim, device=DEVICE, dtype=dtype)
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(rows, pooled, device=DEVICE, dtype=dtype),
             "time_ids": torch.randn(rows, 6, device=DEVICE, dtype=dtype)}
    t = torch.tensor(500.0, device=DEVICE)
    return lambda: unet(sample, t, encoder_hidden_states=text, added_cond_kwargs=added, return_dict=False)[0]


def vae_call(pipe, images: int):
    latents = torch.randn(images, 4, LATENT, LATENT, device=DEVICE, dtype=pipe.vae.dtype)
    return lambda: pipe.vae.decode(latents, return_dict=False)[0]


def pipe_call(runner, images: int):
    """One whole batch as loadgen's worker runs it: the benchmark's captions, latent and settings."""
    captions = [sample_set("base").caption(i) for i in range(images)]
    return lambda: runner.generate(captions)


CALLS = {"unet": (2, 5), "vae": (2, 7), "pipe": (1, 2)}  # warm calls, then timed ones (a pipe call takes seconds)


def build(part: str, opts, rows: int, vae_images: int, cache_dir: Path):
    """The call to time and what apply_optimizations did; pipe: builds the runner a loadgen run uses."""
    if part == "pipe":
        runner = make_runner("synthetic" if SIZE == "full" else "tiny", "bf16", DEVICE, cache_dir=str(cache_dir),
                             optimizations=str(opts))
        return pipe_call(runner, vae_images), runner.info
    pipe = build_random_pipeline(SIZE, "bf16", DEVICE)
    applied = apply_optimizations(pipe, opts, cache_dir)
    return (unet_call(pipe, rows) if part == "unet" else vae_call(pipe, vae_images)), applied


def measure(spec: str, rows: int, vae_images: int, cache_dir: Path, limit: int) -> dict:
    part, _, text = spec.partition(":")
    if part not in CALLS:
        raise SystemExit(f"spec {spec!r}: start it with unet:, vae: or pipe:")
    opts = parse_optimizations(text)
    row: dict = {"spec": spec}
    torch._dynamo.reset()  # every configuration compiles cold (unless CACHE_DIR holds its kernels)
    with own_inductor_settings():
        call, row["applied"] = build(part, opts, rows, vae_images, cache_dir)
        with torch.inference_mode(), sdpa_context(opts.sdpa):
            signal.alarm(limit)
            try:
                started = time.perf_counter()
                call()
                sync()
                row["first_call_s"] = round(time.perf_counter() - started, 1)
            except TimeUp:
                row["first_call_s"] = f"not finished in {limit} s"
                return row
            finally:
                signal.alarm(0)
            warm, timed = CALLS[part]
            call_ms(call, warm)
            if DEVICE == "cuda":
                torch.cuda.reset_peak_memory_stats()
            with gpu_samples(row):
                times = call_ms(call, timed)
            row["ms"] = round(statistics.median(times), 2)
            row["spread_ms"] = [round(min(times), 2), round(max(times), 2)]
            per = rows / 2 if part == "unet" else vae_images
            row["ms_per_image"] = round(row["ms"] / per, 2)
            if DEVICE == "cuda":
                row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
            row["profile"] = profile(call)
            if DEVICE == "cuda":  # kernels of one stream run one at a time: the wall time beyond their sum is idle
                row["gpu_idle_ms"] = round(row["profile"]["wall_ms"] - row["profile"]["gpu_ms"], 2)
    del call
    free_gpu_memory()
    return row


def main() -> None:
    out, rows, vae_images, specs = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    out.mkdir(parents=True, exist_ok=True)
    limit = int(os.environ.get("LIMIT", "240"))
    signal.signal(signal.SIGALRM, _alarm)
    header = {"gpu": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu", "torch": torch.__version__, "rows": rows,
              "vae_images": vae_images, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    results = []
    started = time.time()
    for spec in specs:
        try:
            cache = Path(os.environ["CACHE_DIR"]) if os.environ.get("CACHE_DIR") else out / "cache" / str(len(results))
            row = measure(spec, rows, vae_images, cache, limit)
        except Exception as exc:  # noqa: BLE001 - one broken configuration must not lose the others
            row = {"spec": spec, "error": repr(exc)[:400]}
            free_gpu_memory()
        row["done_at_s"] = round(time.time() - started)
        results.append(row)
        summary = {k: v for k, v in row.items() if k not in ("profile", "applied")}
        print(json.dumps({**summary, "gpu_ms": row.get("profile", {}).get("gpu_ms"),
                          "by_kind": row.get("profile", {}).get("by_kind")}), flush=True)
        (out / "profile.json").write_text(json.dumps({**header, "results": results}, indent=1))
    print("\n| spec | first call s | ms | ms/image | peak GiB |")
    for row in results:
        print(f"| {row['spec']} | {row.get('first_call_s', row.get('error', ''))} | {row.get('ms', '')} | "
              f"{row.get('ms_per_image', '')} | {row.get('peak_gib', '')} |")


if __name__ == "__main__":
    main()
