"""Shared test fixtures: the tiny pipeline (built once per session) and a headless notebook runner; and one
fixed forward of the tiny UNet."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
CI_PARAMS = REPO / "params" / "ci.yaml"


@pytest.fixture(scope="session")
def tiny_runner():
    """The tiny SDXL-shaped pipeline on the CPU, fp32 (a few seconds to build, shared by all tests)."""
    from sccsdxl.pipeline import make_runner

    return make_runner("tiny", "fp32", "cpu")


@pytest.fixture(scope="session")
def ci_params() -> dict:
    return yaml.safe_load(CI_PARAMS.read_text())


def execute_notebook(stem: str, work: Path, params: dict) -> tuple[Path, Path]:
    """Run notebooks/<stem>.ipynb headless in ``work`` with ``params`` (output_dir defaults to work/output)."""
    import papermill as pm

    params = {"output_dir": str(work / "output"), **params}
    out = work / f"{stem}.out.ipynb"
    pm.execute_notebook(str(NOTEBOOKS / f"{stem}.ipynb"), str(out), parameters=params, cwd=str(work),
                        kernel_name="python3", progress_bar=False)
    return out, Path(params["output_dir"])


@pytest.fixture
def run_notebook(tmp_path, ci_params):
    """Execute a notebook with params/ci.yaml (+ overrides); returns (output notebook, output_dir)."""
    return lambda stem, **overrides: execute_notebook(stem, tmp_path, {**ci_params, "output_dir": str(tmp_path / "output"),
                                                                      **overrides})


@pytest.fixture
def cache_in_two_processes(tmp_path):
    """Run a script twice, each time in a new Python process with ``tmp_path`` (its compile cache) as argument:
    what 04's warm start does. Returns the JSON each run printed last; ``unset``: environment variables
    the two processes must not inherit."""
    def run(script: str, unset: tuple[str, ...] = ()) -> list[dict]:
        env = {k: v for k, v in os.environ.items() if k not in unset}
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
        runs = []
        for _ in range(2):
            done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True,
                                  text=True, timeout=600)
            assert done.returncode == 0, done.stderr[-3000:]
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        return runs

    return run


@pytest.fixture
def tuning_in_two_processes(tmp_path):
    """Run a script twice, each time in a new Python process with ``tmp_path`` as Triton's cache directory and
    Triton printing each tuning it times: the kit's kept tuning across a warm start. Returns both outputs."""
    def run(script: str) -> tuple[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "SCCSDXL_CACHE_TUNING"}
        env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_PRINT_AUTOTUNING="1",
                   PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        first, second = (subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                                        timeout=600, check=True).stdout for _ in range(2))
        return first, second

    return run


def assert_interpreted_ok(code: str, timeout: int = 300) -> None:
    """Run ``code`` in a new Python with Triton's CPU interpreter on; it must print "kernel ok"."""
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0 and "kernel ok" in done.stdout, done.stderr[-2000:]


def resnet_block(channels_in: int = 64, channels_out: int = 96, temb: int | None = 48, groups: int = 32,
                 device: str = "cpu", dtype=None):
    """A ResnetBlock2D as SDXL's UNet builds them (32 groups, a time embedding, a shortcut when widths differ), its
    norms' affine parameters away from their 1 / 0 start, as trained ones are (and so that a swapped pair shows)."""
    import torch
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=channels_in, out_channels=channels_out, temb_channels=temb, groups=groups).eval()
    with torch.no_grad():
        for norm in (block.norm1, block.norm2):
            norm.weight.copy_(torch.rand_like(norm.weight) + 0.5)
            norm.bias.copy_(torch.randn_like(norm.bias) * 0.1)
    return block.to(device, dtype or torch.float32)


def relative_error(test, reference) -> float:
    """||test - reference|| / ||reference||, in fp32: how the fused kernels' tests compare with their references."""
    test, reference = test.detach().float(), reference.detach().float()
    return float((test - reference).norm() / reference.norm())


def tiny_unet_inputs(unet, device: str = "cpu", dtype=None, seed: int = 1):
    """A fixed latent, text and time-embedding input for a tiny UNet (2 rows): (sample, text, added_cond_kwargs)."""
    import torch

    torch.manual_seed(seed)
    config = unet.config
    sample = torch.randn(2, 4, 32, 32, device=device, dtype=dtype)
    text = torch.randn(2, 77, config.cross_attention_dim, device=device, dtype=dtype)
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(2, pooled, device=device, dtype=dtype),
             "time_ids": torch.rand(2, 6, device=device, dtype=dtype)}
    return sample, text, added


def tiny_vae_decode(pipe, images: int = 2, device: str = "cpu", dtype=None):
    """One fixed decode of ``images`` random latents by the tiny pipeline's VAE, as a function."""
    import torch

    torch.manual_seed(2)
    latents = torch.randn(images, 4, 16, 16, device=device, dtype=dtype or torch.float32)
    return lambda: pipe.vae.decode(latents, return_dict=False)[0]


def tiny_unet_call(unet, device: str = "cpu", dtype=None):
    """One fixed forward of a tiny UNet (2 rows), as a function returning a copy of its output (a CUDA graph
    replay overwrites the output it returned before)."""
    import torch

    dtype = dtype or torch.bfloat16
    sample, text, added = tiny_unet_inputs(unet, device, dtype)

    def call():
        with torch.inference_mode():
            return unet(sample, 500, encoder_hidden_states=text, added_cond_kwargs=added).sample.clone()
    return call


def tiny_unet_swaps(options: str):
    """The tiny bf16 pipeline on the CPU with ``options`` applied, and what the module-swap tests compare: its
    transformer blocks counted and its UNet's output taken before, as (pipe, blocks, call, before, info)."""
    from sccsdxl.pipeline import build_random_pipeline
    from sccsdxl.quant import apply_optimizations, parse_optimizations

    pipe = build_random_pipeline("tiny", "bf16", "cpu")
    blocks = sum(type(m).__name__ == "BasicTransformerBlock" for m in pipe.unet.modules())
    call = tiny_unet_call(pipe.unet)
    before = call()
    info = apply_optimizations(pipe, parse_optimizations(options))
    return pipe, blocks, call, before, info
