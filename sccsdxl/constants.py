"""The benchmark's fixed settings (MLPerf Inference SDXL, closed division), all in one place.

Nothing here is a tuning knob: the rules fix every value. 01_setup shows them to the reader.
Source for each value: ``shared/spec/mlperf-sdxl.md`` §1-2 (MLCommons reference ``text_to_image/``).
"""
from __future__ import annotations

from types import MappingProxyType

MODEL_NAME = "stable-diffusion-xl"  # loadgen / checker benchmark name
SCENARIO = "Offline"
HF_MODEL_ID = "stabilityai/stable-diffusion-xl-base-1.0"

NUM_INFERENCE_STEPS = 20
GUIDANCE_SCALE = 8.0
IMAGE_HEIGHT = 1024
IMAGE_WIDTH = 1024
VAE_SCALE_FACTOR = 8
LATENT_SHAPE = (1, 4, IMAGE_HEIGHT // VAE_SCALE_FACTOR, IMAGE_WIDTH // VAE_SCALE_FACTOR)
NEGATIVE_PROMPT = "normal quality, low quality, worst quality, low res, blurry, nsfw, nude"
TOKENIZER_MAX_LENGTH = 77

# One response per sample: uint8, height x width x RGB.
RESPONSE_SHAPE = (IMAGE_HEIGHT, IMAGE_WIDTH, 3)
RESPONSE_BYTES = IMAGE_HEIGHT * IMAGE_WIDTH * 3  # 3,145,728

# Warm-up prompt of the reference harness (main.py); its outputs are never scored.
WARMUP_PROMPT = "Lorem ipsum dolor sit amet, consectetur adipiscing elit"

# Closed-division accuracy window (checker: accuracy-target .. accuracy-upper-limit, both inclusive).
CLIP_BOUNDS = (31.68631873, 31.81331801)
FID_BOUNDS = (23.01085758, 23.95007626)

# Scheduler config of the SDXL 1.0 base checkpoint (EulerDiscreteScheduler); synthetic/tiny models use it too.
SCHEDULER_CONFIG = MappingProxyType({
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "trained_betas": None,
})

DATASET_ROWS = 5000  # rows of captions_source.tsv


def as_table() -> list[tuple[str, str]]:
    """The fixed settings as (name, value) rows, for display."""
    return [
        ("model", f"SDXL 1.0 base ({HF_MODEL_ID}), no refiner"),
        ("scheduler", "EulerDiscreteScheduler from the checkpoint (timestep_spacing=leading, steps_offset=1)"),
        ("denoising steps", str(NUM_INFERENCE_STEPS)),
        ("guidance scale", str(GUIDANCE_SCALE)),
        ("image size", f"{IMAGE_WIDTH}x{IMAGE_HEIGHT}"),
        ("initial latent", f"one fixed fp32 tensor {LATENT_SHAPE}, the same for every sample"),
        ("negative prompt", NEGATIVE_PROMPT),
        ("prompt encoding", "penultimate hidden states of CLIP-L and CLIP-bigG concatenated; pooled output of CLIP-bigG"),
        ("response", f"uint8 HWC {RESPONSE_SHAPE} = {RESPONSE_BYTES:,} bytes per sample"),
        ("CLIP score window", f"{CLIP_BOUNDS[0]} .. {CLIP_BOUNDS[1]}"),
        ("FID window", f"{FID_BOUNDS[0]} .. {FID_BOUNDS[1]}"),
    ]
