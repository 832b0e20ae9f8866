"""Option text_kv_once: the cross-attentions' text projections computed once per text, on the CPU."""
import copy

import pytest
import torch

from sccsdxl import fused, quant
from sccsdxl import text_cache as T
from sccsdxl.errors import ParameterError
from sccsdxl.pipeline import build_random_pipeline, make_runner

from conftest import tiny_unet_inputs

PROMPTS = ["a red bus", "a bowl of fruit"]


def unet_inputs(unet, dtype=torch.float32, device="cpu"):
    """A function running a tiny UNet (2 rows) on a fixed latent with a given text, and one making texts."""
    sample, _, added = tiny_unet_inputs(unet, device, dtype)

    def run(model, text):
        with torch.no_grad():
            return model(sample, 500, encoder_hidden_states=text, added_cond_kwargs=added).sample

    return run, lambda seed: tiny_unet_inputs(unet, device, dtype, seed)[1]


@pytest.mark.parametrize("fuse_qkv", [False, True])  # to_k and to_v apart, or diffusers' fused to_kv
def test_projections_run_once_per_text_and_the_unet_computes_the_same(fuse_qkv):
    pipe = build_random_pipeline("tiny", "fp32", "cpu")
    if fuse_qkv:
        pipe.fuse_qkv_projections()
    reference = copy.deepcopy(pipe.unet)
    run, text = unet_inputs(pipe.unet)
    hook = T.cache_text_projections(pipe.unet)
    cross = [m for m in reference.modules() if type(m).__name__ == "Attention" and m.is_cross_attention]
    assert len(hook.caches) == len(cross) * (1 if fuse_qkv else 2) > 0
    first, second = text(1), text(2)
    for _ in range(3):  # the steps of one batch
        assert torch.equal(run(pipe.unet, first), run(reference, first))
    assert hook.refreshes == 1
    assert torch.equal(run(pipe.unet, second), run(reference, second))  # a new batch's text
    assert hook.refreshes == 2
    second.mul_(0.5)  # the same tensor changed in place
    assert torch.equal(run(pipe.unet, second), run(reference, second))
    assert hook.refreshes == 3


def test_text_changed_in_inference_mode_is_a_new_tensor_each_batch():
    """The kit generates in inference mode, where tensors keep no version counter: a new batch is a new tensor."""
    pipe = build_random_pipeline("tiny", "fp32", "cpu")
    reference = copy.deepcopy(pipe.unet)
    run, text = unet_inputs(pipe.unet)
    hook = T.cache_text_projections(pipe.unet)
    with torch.inference_mode():
        for seed in (1, 2):
            batch_text = text(seed)
            assert torch.equal(run(pipe.unet, batch_text), run(reference, batch_text))
            assert torch.equal(run(pipe.unet, batch_text), run(reference, batch_text))
    assert hook.refreshes == 2


def test_compiled_regions_read_each_new_text_without_recompiling():
    from torch._dynamo.utils import counters

    pipe = build_random_pipeline("tiny", "fp32", "cpu")
    pipe.fuse_qkv_projections()
    reference = copy.deepcopy(pipe.unet)
    run, text = unet_inputs(pipe.unet)
    T.cache_text_projections(pipe.unet)
    torch._dynamo.reset()
    for module in pipe.unet.modules():
        if type(module).__name__ == "Transformer2DModel":  # the regions compile_transformers compiles
            module.compile(backend="aot_eager", fullgraph=True)
    first, second = text(1), text(2)
    assert torch.allclose(run(pipe.unet, first), run(reference, first), atol=1e-5)
    graphs = counters["stats"]["unique_graphs"]
    assert torch.allclose(run(pipe.unet, second), run(reference, second), atol=1e-5)  # not the first text's
    assert counters["stats"]["unique_graphs"] == graphs > 0


def test_fused_blocks_take_their_projection_from_the_cache():
    pipe = build_random_pipeline("tiny", "bf16", "cpu")
    pipe.fuse_qkv_projections()
    fused.fuse_transformer_blocks(pipe.unet)
    reference = copy.deepcopy(pipe.unet)
    run, text = unet_inputs(pipe.unet, torch.bfloat16)
    hook = T.cache_text_projections(pipe.unet)
    blocks = [m for m in pipe.unet.modules() if isinstance(m, fused.Fp8TransformerBlock)]
    assert len(hook.caches) == len(blocks) > 0 and all(isinstance(b.kv2, T.TextProjectionCache) for b in blocks)
    for seed in (1, 2):
        assert torch.equal(run(pipe.unet, text(seed)), run(reference, text(seed)))


def test_the_option_builds_in_the_pipeline_and_keeps_the_images(tiny_runner):
    reference = tiny_runner.generate(PROMPTS)
    runner = make_runner("tiny", "fp32", "cpu", optimizations="fuse_qkv,text_kv_once", latent=tiny_runner.latent)
    assert runner.info["text_projections_once"] > 0
    assert quant.compare_images("text_kv_once", reference, runner.generate(PROMPTS)).mean_psnr_db > 60
    assert "text_kv_once" in quant.supported_options("cpu")


def test_misuse_says_what_is_wrong():
    pipe = build_random_pipeline("tiny", "fp32", "cpu")
    hook = T.cache_text_projections(pipe.unet)
    with pytest.raises(ParameterError, match="applied to this UNet already"):
        T.cache_text_projections(pipe.unet)
    with pytest.raises(RuntimeError, match="before the UNet's pre-hook"):
        hook.caches[0](torch.zeros(1, 77, pipe.unet.config.cross_attention_dim))
    other = build_random_pipeline("tiny", "fp32", "cpu").unet
    other.encoder_hid_proj = torch.nn.Linear(4, 4)
    with pytest.raises(ParameterError, match="projects its text embeddings"):
        T.cache_text_projections(other)


def test_a_buffer_made_in_inference_mode_is_replaced_outside_it():
    cache = T.TextProjectionCache(torch.nn.Linear(8, 4))
    with torch.inference_mode():
        cache.refresh(torch.ones(1, 3, 8))
    made = cache.projected
    cache.refresh(torch.zeros(1, 3, 8))  # torch forbids writing into an inference tensor out here
    assert cache.projected is not made and torch.equal(cache.projected, cache.projection(torch.zeros(1, 3, 8)))
    kept = cache.projected
    cache.refresh(torch.ones(1, 3, 8))
    assert cache.projected is kept  # the same tensor, new values: what compiled regions and CUDA graphs read


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor's GPU code and CUDA graphs (run on the H200)")
@pytest.mark.parametrize("graphs", [False, True])
def test_compiled_and_graphed_regions_read_each_new_text_on_the_gpu(tmp_path, graphs):
    """What a loadgen run does on the H200: compiled regions (replayed as CUDA graphs with cuda_graphs) over batch
    after batch of new texts, each read from the same buffers."""
    pipe = build_random_pipeline("tiny", "bf16", "cuda")
    reference = copy.deepcopy(pipe.unet)
    options = "fuse_qkv,compile,compile_transformers,text_kv_once" + (",cuda_graphs" if graphs else "")
    quant.apply_optimizations(pipe, quant.parse_optimizations(options), tmp_path)
    run, text = unet_inputs(pipe.unet, torch.bfloat16, "cuda")
    with torch.inference_mode():
        for batch in range(3):
            batch_text = text(batch)
            expected = run(reference, batch_text)
            for step in range(3):  # warm-up, recording, then replays with cuda_graphs
                got = run(pipe.unet, batch_text).clone()
                error = float((got.float() - expected.float()).norm() / expected.float().norm())
                assert error < 2e-2, (batch, step, error)
