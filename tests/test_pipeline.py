import json

import numpy as np
import pytest
import torch

from sccsdxl import constants as C
from sccsdxl import pipeline as P
from sccsdxl.errors import DeviceError, ModelError, ParameterError

FIRST_CAPTION = "A city at night with people walking around."


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    return P.build_clip_tokenizers(tmp_path_factory.mktemp("bpe"))


def test_tokenizers_are_clips_bpe_with_sdxls_padding(tokenizers):
    tok, tok2 = tokenizers
    assert len(tok) == len(tok2) == 49408 and tok.model_max_length == 77
    ids = tok(FIRST_CAPTION).input_ids
    assert ids == [49406, 320, 1305, 536, 930, 593, 1047, 3941, 1630, 269, 49407]
    padded = tok(FIRST_CAPTION, padding="max_length", max_length=77, truncation=True).input_ids
    padded2 = tok2(FIRST_CAPTION, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77 and padded[11] == 49407 and padded2[11] == 0  # <|endoftext|> vs '!'


def test_tokenizers_without_a_cache_dir_leave_no_files_behind(tmp_path, monkeypatch):
    """Each pipeline built without a cache directory once left a 2 MB vocabulary copy in the temp folder."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    tok, tok2 = P.build_clip_tokenizers()
    assert tok(FIRST_CAPTION).input_ids[:3] == [49406, 320, 1305] and len(tok2) == 49408
    assert list(tmp_path.iterdir()) == []


def test_tokenizer_matches_open_clip(tokenizers):
    import open_clip

    ids = tokenizers[0](FIRST_CAPTION, padding="max_length", max_length=77, truncation=True).input_ids
    reference = open_clip.tokenize([FIRST_CAPTION])[0].tolist()
    assert ids[:11] == reference[:11]


def test_encoding_is_the_references(tiny_runner):
    """Penultimate hidden states of both encoders concatenated; pooled output of the second."""
    pipe = tiny_runner.pipe
    prompts = [FIRST_CAPTION, "a dog"]
    embeds, neg_embeds, pooled, neg_pooled = tiny_runner.encode(prompts)

    def manual(texts):
        states, pooled_out = [], None
        for tok, enc in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
            ids = tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            out = enc(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled_out = out[0]
        return torch.cat(states, dim=-1), pooled_out

    with torch.no_grad():
        want, want_pooled = manual(prompts)
        want_neg, want_neg_pooled = manual([C.NEGATIVE_PROMPT] * 2)
    assert embeds.shape == (2, 77, 64)  # tiny: 32 + 32 (full size: 768 + 1280)
    torch.testing.assert_close(embeds, want)
    torch.testing.assert_close(pooled, want_pooled)
    torch.testing.assert_close(neg_embeds, want_neg)
    torch.testing.assert_close(neg_pooled, want_neg_pooled)


def test_tiny_images_are_uint8_and_independent_of_the_batch(tiny_runner):
    batch = tiny_runner.generate([FIRST_CAPTION, "a red bus", "a bowl of fruit"])
    alone = tiny_runner.generate(["a red bus"])
    assert batch.shape == (3, 32, 32, 3) and batch.dtype == np.uint8
    assert np.abs(batch[1].astype(int) - alone[0]).max() <= 1
    assert not np.array_equal(batch[0], batch[1])  # the prompt matters
    assert tiny_runner.response_shape == (32, 32, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked copies need a GPU (run on the H200)")
def test_images_come_to_the_host_whole_and_each_batch_in_its_own_memory():
    """to_host reuses page-locked memory from torch's cache: an array still held must not be overwritten."""
    first_pixels = torch.randint(0, 256, (3, 8, 8, 3), dtype=torch.uint8, device="cuda")
    first = P.to_host(first_pixels)
    second = P.to_host(torch.zeros_like(first_pixels))
    assert isinstance(first, np.ndarray) and first.dtype == np.uint8
    assert np.array_equal(first, first_pixels.cpu().numpy()) and not second.any()


def test_synthetic_is_the_full_size_sdxl_architecture():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        counts = {
            "unet": UNet2DConditionModel(**P.SDXL_UNET_CONFIG),
            "vae": AutoencoderKL(**P.SDXL_VAE_CONFIG),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**P.SDXL_TEXT_CONFIG)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**P.SDXL_TEXT2_CONFIG)),
        }
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in counts.items()}
    assert params == {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                      "text_encoder_2": 694_659_840}


def test_mlcommons_checkpoint_layout_loads(tmp_path, tiny_runner):
    root = tmp_path / "stable_diffusion_fp32"
    tiny_runner.pipe.save_pretrained(root / "checkpoint_pipe")
    (root / "checkpoint_scheduler").mkdir()
    (root / "checkpoint_scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "EulerDiscreteScheduler", **dict(C.SCHEDULER_CONFIG)}))
    runner = P.make_runner("mlcommons", "fp32", "cpu", model_path=str(root), latent=tiny_runner.latent)
    np.testing.assert_array_equal(runner.generate(["a red bus"]), tiny_runner.generate(["a red bus"]))
    assert runner.info["scorable"] is True


def test_hf_source_loads_from_the_hub_cache(tmp_path, tiny_runner, monkeypatch):
    """The hf route reads the standard Hugging Face cache layout (fp16 variant files for fp16)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    repo = tmp_path / "models--stabilityai--stable-diffusion-xl-base-1.0"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    tiny_runner.pipe.to(torch.float16).save_pretrained(repo / "snapshots" / commit, variant="fp16")
    tiny_runner.pipe.to(torch.float32)
    pipe = P.load_pipeline("hf", "fp16", "cpu", hf_cache_dir=str(tmp_path))
    assert pipe.unet.dtype == torch.float16
    assert sum(p.numel() for p in pipe.unet.parameters()) == tiny_runner.info["parameters"]["unet"]


def test_missing_hf_weights_say_how_to_fetch_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="are not in the Hugging Face cache") as err:
        P.load_pipeline("hf", "fp16", "cpu", hf_cache_dir=str(tmp_path))
    assert "01_setup" in err.value.fix and "fetch_sdxl('fp16')" in err.value.fix


def test_weights_fetched_by_setup_are_found_in_the_data_dir(tmp_path):
    from sccsdxl.assets import hf_cache_dir

    assert P.hf_cache_for(str(tmp_path)) is None  # nothing fetched: the default Hugging Face cache
    (hf_cache_dir(tmp_path) / "models--stabilityai--stable-diffusion-xl-base-1.0").mkdir(parents=True)
    assert P.hf_cache_for(str(tmp_path)) == str(hf_cache_dir(tmp_path))


def test_missing_mlcommons_checkpoint_names_the_layout(tmp_path):
    (tmp_path / "checkpoint_pipe").mkdir()
    with pytest.raises(ModelError, match="missing checkpoint_pipe/model_index.json, "
                                         "checkpoint_scheduler/scheduler_config.json"):
        P.load_pipeline("mlcommons", "fp16", "cpu", model_path=str(tmp_path))


def test_bad_source_dtype_and_device_are_named():
    with pytest.raises(ParameterError, match="unknown model_source 'sd15'"):
        P.load_pipeline("sd15")
    with pytest.raises(ParameterError, match="unknown dtype 'int4'"):
        P.torch_dtype("int4")
    with pytest.raises(ParameterError, match="unknown device 'tpu'"):
        P.resolve_device("tpu", "tiny")


def test_cpu_only_when_asked_or_tiny(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert P.resolve_device("auto", "tiny") == "cpu"
    assert P.resolve_device("cpu", "synthetic") == "cpu"
    with pytest.raises(DeviceError, match="needs one"):
        P.resolve_device("auto", "hf")
    with pytest.raises(DeviceError, match="sees no GPU"):
        P.resolve_device("cuda", "tiny")
