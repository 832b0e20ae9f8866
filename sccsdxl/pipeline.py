"""Building the SDXL pipeline from one of four sources, and running it the way the MLPerf reference does.

Sources:
  hf         stabilityai/stable-diffusion-xl-base-1.0 from the Hugging Face cache (fp16 variant for fp16)
  mlcommons  a local MLCommons checkpoint directory (checkpoint_pipe/ + checkpoint_scheduler/)
  synthetic  the full-size SDXL architecture with random weights: real compute, meaningless images
  tiny       a small SDXL-shaped pipeline for CPU tests (32x32 images from a crop of the fixed latent)
"""
from __future__ import annotations

import gzip
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import constants as C
from .errors import DeviceError, ModelError, ParameterError
from .record import write_text_atomic

SOURCES = ("hf", "mlcommons", "synthetic", "tiny")
DTYPES = ("fp32", "fp16", "bf16")
DEVICES = ("auto", "cuda", "cpu")
SCORABLE_SOURCES = ("hf", "mlcommons")  # only real weights give images worth scoring

# Published SDXL 1.0 base component configs (mlperf-sdxl.md §11).
SDXL_UNET_CONFIG = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816, "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True,
}
SDXL_VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32, "act_fn": "silu",
    "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True,
}
SDXL_TEXT_CONFIG = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                    "projection_dim": 768}
SDXL_TEXT2_CONFIG = {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                     "num_attention_heads": 20, "max_position_embeddings": 77, "hidden_act": "gelu",
                     "projection_dim": 1280}

# The tiny test pipeline: same classes and wiring, a few thousand times smaller.
TINY_LATENT_SIZE = 16  # latent 4x16x16 (the top-left crop of the fixed latent), image 32x32: CI-sized
TINY_UNET_CONFIG = {
    "block_out_channels": [32, 64], "layers_per_block": 1, "sample_size": TINY_LATENT_SIZE, "in_channels": 4,
    "out_channels": 4, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "attention_head_dim": [2, 4],
    "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
    "transformer_layers_per_block": [1, 1], "projection_class_embeddings_input_dim": 6 * 8 + 32,
    "cross_attention_dim": 64, "norm_num_groups": 8,
}
TINY_VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [16, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
    "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 2 * TINY_LATENT_SIZE,
    "scaling_factor": 0.13025, "force_upcast": True,
}
TINY_TEXT_CONFIG = {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 3,
                    "num_attention_heads": 4, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                    "projection_dim": 32}
TINY_TEXT2_CONFIG = {**TINY_TEXT_CONFIG, "hidden_act": "gelu"}

log = logging.getLogger(__name__)


def torch_dtype(name: str):
    import torch

    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name not in table:
        raise ParameterError(f"unknown dtype {name!r}", f"use one of {', '.join(DTYPES)} (e.g. -p dtype fp16)")
    return table[name]


def resolve_device(device: str, source: str) -> str:
    """'auto' means the GPU (CUDA or ROCm builds of torch); the CPU only when asked, or for the tiny model."""
    import torch

    if device not in DEVICES:
        raise ParameterError(f"unknown device {device!r}", f"use one of {', '.join(DEVICES)} (e.g. -p device auto)")
    has_gpu = torch.cuda.is_available()  # true on ROCm builds too
    if device == "auto":
        if has_gpu:
            return "cuda"
        if source == "tiny":
            return "cpu"
        raise DeviceError(f"no GPU is visible to torch {torch.__version__}, and model_source {source!r} needs one",
                          "run on a GPU node (check nvidia-smi / rocm-smi and that torch is a CUDA or ROCm build), "
                          "or use -p model_source tiny for a CPU rehearsal, or -p device cpu to force a (very slow) CPU run")
    if device == "cuda" and not has_gpu:
        raise DeviceError(f"device 'cuda' was asked for but torch {torch.__version__} sees no GPU",
                          "run on a GPU node, or use -p device cpu with -p model_source tiny")
    return device


def clip_tokenizer_files(directory: Path) -> Path:
    """Write CLIP's BPE vocabulary (vocab.json, merges.txt) from the copy inside open_clip; no network needed."""
    from open_clip import tokenizer as oc_tokenizer

    directory = Path(directory)
    if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(oc_tokenizer.default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]  # the 48,894 merges CLIP uses
    byte_tokens = list(oc_tokenizer.bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    # processes starting together (one per GPU) never read a half-written file
    write_text_atomic(directory / "vocab.json", json.dumps({t: i for i, t in enumerate(tokens)}))
    write_text_atomic(directory / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    return directory


def build_clip_tokenizers(cache_dir: Path | None = None):
    """SDXL's two tokenizers: identical BPE; tokenizer pads with <|endoftext|>, tokenizer_2 with '!' (id 0)."""
    import tempfile

    from transformers import CLIPTokenizer

    if cache_dir is None:  # the tokenizers read both files when made: a scratch copy is removed right after
        with tempfile.TemporaryDirectory(prefix="sccsdxl-bpe-") as scratch:
            return build_clip_tokenizers(Path(scratch))
    directory = clip_tokenizer_files(Path(cache_dir))
    tokenizer = CLIPTokenizer.from_pretrained(str(directory), model_max_length=C.TOKENIZER_MAX_LENGTH)
    tokenizer_2 = CLIPTokenizer.from_pretrained(str(directory), model_max_length=C.TOKENIZER_MAX_LENGTH, pad_token="!")
    return tokenizer, tokenizer_2


def _scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(**dict(C.SCHEDULER_CONFIG))


def build_random_pipeline(size: str, dtype: str, device: str, tokenizer_dir: Path | None = None, seed: int = 0):
    """SDXL pipeline from configs with random weights: size 'full' (synthetic) or 'tiny'."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    configs = {"full": (SDXL_UNET_CONFIG, SDXL_VAE_CONFIG, SDXL_TEXT_CONFIG, SDXL_TEXT2_CONFIG),
               "tiny": (TINY_UNET_CONFIG, TINY_VAE_CONFIG, TINY_TEXT_CONFIG, TINY_TEXT2_CONFIG)}[size]
    unet_cfg, vae_cfg, text_cfg, text2_cfg = configs
    tokenizer, tokenizer_2 = build_clip_tokenizers(tokenizer_dir)
    torch.manual_seed(seed)
    with torch.device(device):  # initialise in place: the full UNet is 2.6 B parameters
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text2_cfg))
    quiet_diffusers()
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=_scheduler(),
                                     add_watermarker=False)
    return pipe.to(device=device, dtype=torch_dtype(dtype))


def hf_cache_for(data_dir: str | None) -> str | None:
    """The kit's Hugging Face cache under data_dir when 01_setup fetched SDXL there, else the default HF cache."""
    from .assets import hf_cache_dir

    kit_cache = hf_cache_dir(data_dir or None)
    repo = "models--" + C.HF_MODEL_ID.replace("/", "--")
    return str(kit_cache) if (kit_cache / repo).is_dir() else None


def _hf_pipeline(dtype: str, cache_dir: str | None):
    from diffusers import StableDiffusionXLPipeline

    from .assets import fetch_command

    kwargs: dict[str, Any] = {"torch_dtype": torch_dtype(dtype), "use_safetensors": True, "add_watermarker": False}
    if dtype == "fp16":
        kwargs["variant"] = "fp16"
    try:
        return StableDiffusionXLPipeline.from_pretrained(C.HF_MODEL_ID, cache_dir=cache_dir, **kwargs)
    except (OSError, ValueError) as exc:  # missing files, offline mode, no network
        raise ModelError(f"SDXL weights for {C.HF_MODEL_ID} ({dtype}) are not in the Hugging Face cache "
                         f"{cache_dir or '(default HF_HOME)'} and could not be downloaded: {str(exc).splitlines()[0]}",
                         f"fetch them first: papermill notebooks/01_setup.ipynb out.ipynb -p fetch sdxl, or "
                         f"{fetch_command(f'sdxl_{dtype}')}; or use -p model_source mlcommons -p model_path <dir>") from None


def check_mlcommons_dir(model_path: str | Path | None) -> Path:
    """An MLCommons checkpoint directory must hold checkpoint_pipe/ and checkpoint_scheduler/."""
    if not model_path:
        raise ParameterError("model_source 'mlcommons' needs model_path",
                             "pass -p model_path <dir holding checkpoint_pipe/ and checkpoint_scheduler/>")
    root = Path(model_path).expanduser()
    needed = [root / "checkpoint_pipe" / "model_index.json", root / "checkpoint_scheduler" / "scheduler_config.json"]
    missing = [str(p.relative_to(root)) for p in needed if not p.is_file()]
    if missing:
        raise ModelError(f"{root} is not an MLCommons SDXL checkpoint: missing {', '.join(missing)}",
                         "download it (mlcr get,ml-model,sdxl,_fp16,_r2-downloader --outdirname=<dir>) and unpack it, "
                         "then pass -p model_path <dir>")
    return root


def _mlcommons_pipeline(model_path: str | Path | None, dtype: str):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    root = check_mlcommons_dir(model_path)
    scheduler = EulerDiscreteScheduler.from_pretrained(str(root / "checkpoint_scheduler"), subfolder="scheduler")
    return StableDiffusionXLPipeline.from_pretrained(str(root / "checkpoint_pipe"), scheduler=scheduler,
                                                     torch_dtype=torch_dtype(dtype), add_watermarker=False)


def load_pipeline(source: str = "hf", dtype: str = "fp16", device: str = "auto", model_path: str | None = None,
                  cache_dir: str | None = None, hf_cache_dir: str | None = None):
    """The diffusers SDXL pipeline from one of SOURCES, on the resolved device, progress bar off.

    cache_dir: the kit's working cache (tokenizer files, compiled kernels); hf_cache_dir: the Hugging Face cache.
    """
    if source not in SOURCES:
        raise ParameterError(f"unknown model_source {source!r}",
                             f"use one of {', '.join(SOURCES)} (e.g. -p model_source hf)")
    torch_dtype(dtype)
    target = resolve_device(device, source)
    if source == "hf":
        pipe = _hf_pipeline(dtype, hf_cache_dir).to(target)
    elif source == "mlcommons":
        pipe = _mlcommons_pipeline(model_path, dtype).to(target)
    else:
        pipe = build_random_pipeline("full" if source == "synthetic" else "tiny", dtype, target,
                                     tokenizer_dir=Path(cache_dir) / "clip-bpe" if cache_dir else None)
    pipe.set_progress_bar_config(disable=True)
    quiet_diffusers()
    return pipe


def quiet_diffusers() -> None:
    """Silence diffusers' per-call notices (fp32 VAE upcast on every fp16 call) that would flood notebook output."""
    import warnings

    logging.getLogger("diffusers.models.modeling_utils").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*upcast_vae.*", category=FutureWarning)


def free_gpu_memory() -> None:
    """Give cached GPU memory back (after a model is dropped or an out-of-memory batch left it fragmented)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def parameter_counts(pipe) -> dict[str, int]:
    names = ("unet", "vae", "text_encoder", "text_encoder_2")
    return {n: sum(p.numel() for p in getattr(pipe, n).parameters()) for n in names}


@dataclass
class SDXLRunner:
    """Turns a batch of captions into uint8 HWC images exactly as the reference backend does."""

    pipe: Any
    latent: Any  # (1,4,h,w) fp32, the fixed benchmark latent (cropped for the tiny model)
    source: str = "hf"
    dtype: str = "fp16"
    info: dict = field(default_factory=dict)
    sdpa: str = "auto"  # attention backend (sccsdxl.quant.SDPA_BACKENDS)
    pad_to: int = 0  # compiled models: pad short batches to this size so no new graph is compiled mid-run
    exact_sizes: set = field(default_factory=set)  # short batch sizes compiled during warm-up: served unpadded
    one_thread: bool = False  # CUDA graph trees are per thread: every call must run where the graphs were recorded
    _thread: ThreadPoolExecutor | None = field(default=None, init=False, repr=False)

    @property
    def device(self):
        return self.pipe.unet.device

    @property
    def image_size(self) -> tuple[int, int]:
        scale = self.pipe.vae_scale_factor
        return int(self.latent.shape[2] * scale), int(self.latent.shape[3] * scale)

    @property
    def response_shape(self) -> tuple[int, int, int]:
        height, width = self.image_size
        return height, width, 3

    def encode(self, prompts: list[str]):
        """Penultimate hidden states of both encoders (B,77,2048) and CLIP-bigG's pooled output, for prompt and negative."""
        return self.pipe.encode_prompt(prompt=prompts, device=self.device, num_images_per_prompt=1,
                                       do_classifier_free_guidance=True,
                                       negative_prompt=[C.NEGATIVE_PROMPT] * len(prompts))

    def generate(self, prompts: list[str]) -> np.ndarray:
        """(B, H, W, 3) uint8 images, one per prompt, all from the fixed latent."""
        if self.one_thread:  # warm-up, loadgen's worker and the guard call from different threads
            if self._thread is None:
                self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sccsdxl-cuda-graphs")
            return self._thread.submit(self._generate_padded, prompts).result()
        return self._generate_padded(prompts)

    def _generate_padded(self, prompts: list[str]) -> np.ndarray:
        count = len(prompts)
        if 0 < count < self.pad_to and count not in self.exact_sizes:  # extra rows repeat the last prompt, dropped
            return self._generate(list(prompts) + [prompts[-1]] * (self.pad_to - count))[:count]
        return self._generate(prompts)

    def _generate(self, prompts: list[str]) -> np.ndarray:
        import torch

        from .quant import sdpa_context

        with torch.inference_mode(), sdpa_context(self.sdpa):
            prompt_embeds, negative_embeds, pooled, negative_pooled = self.encode(prompts)
            latents = self.latent.to(device=self.device, dtype=self.pipe.unet.dtype).expand(len(prompts), -1, -1, -1)
            height, width = self.image_size
            images = self.pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds,
                               pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=negative_pooled,
                               guidance_scale=C.GUIDANCE_SCALE, num_inference_steps=C.NUM_INFERENCE_STEPS,
                               height=height, width=width, latents=latents, output_type="pt").images
            pixels = (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8)
        return to_host(pixels)


def to_host(pixels) -> np.ndarray:
    """Images on the device -> numpy. From a GPU through page-locked memory, which torch's caching host allocator
    hands out again batch after batch: the plain (pageable) copy of a batch of 50 took about 0.1 s of a 22-s batch on
    the H200's VM (BENCHMARKS.md, session 15), while the GPU waited for the next batch."""
    import torch

    if pixels.device.type != "cuda":
        return pixels.cpu().numpy()
    host = torch.empty(pixels.shape, dtype=pixels.dtype, pin_memory=True)
    host.copy_(pixels)
    return host.numpy()


def make_runner(source: str = "hf", dtype: str = "fp16", device: str = "auto", model_path: str | None = None,
                cache_dir: str | None = None, latent=None, optimizations: str = "", data_dir: str = "") -> SDXLRunner:
    """Load the pipeline, apply the optimization options, pair it with the fixed latent (tiny: top-left crop)."""
    from .data import load_latents
    from .quant import apply_optimizations, check_optimizations, parse_optimizations

    opts = parse_optimizations(optimizations)
    check_optimizations(opts, dtype, resolve_device(device, source))
    pipe = load_pipeline(source, dtype, device, model_path, cache_dir,
                         hf_cache_dir=hf_cache_for(data_dir) if source == "hf" else None)
    applied = apply_optimizations(pipe, opts, cache_dir)
    latent = load_latents() if latent is None else latent
    if source == "tiny":
        latent = latent[:, :, :TINY_LATENT_SIZE, :TINY_LATENT_SIZE].contiguous()
    info = {"source": source, "dtype": dtype, "device": str(pipe.unet.device), "parameters": parameter_counts(pipe),
            "scorable": source in SCORABLE_SOURCES, **applied}
    return SDXLRunner(pipe=pipe, latent=latent, source=source, dtype=dtype, info=info, sdpa=opts.sdpa,
                      one_thread=opts.cuda_graphs)
