import shutil

import pytest
import torch

from sccsdxl import data
from sccsdxl.errors import DataError, ParameterError


def test_captions_are_the_5000_row_file():
    captions = data.load_captions()
    assert len(captions) == 5000
    assert list(captions.columns) == ["id", "image_id", "caption", "height", "width", "file_name", "coco_url"]
    first = captions.iloc[0]
    assert (first["id"], first["image_id"], first["caption"]) == (70, 227049, "A city at night with people walking around.")
    assert captions["id"].iloc[-1] == 829300 and captions["image_id"].is_unique


def test_latent_is_the_fixed_fp32_tensor():
    latents = data.load_latents()
    assert latents.shape == (1, 4, 128, 128) and latents.dtype == torch.float32
    # tools/latent.py: randn from a seed-0 generator; the shipped file matches it up to the last bit
    regenerated = torch.randn((1, 4, 128, 128), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(latents, regenerated, atol=1e-6)


@pytest.mark.parametrize("variant,size", [("base", 50), ("main", 500), ("full", 5000)])
def test_variant_subsets_are_the_first_rows(variant, size):
    captions = data.load_captions()
    samples = data.sample_set(variant, captions)
    assert len(samples) == size
    assert samples.table["source_row"].tolist() == list(range(size))
    assert samples.captions == captions["caption"].iloc[:size].tolist()


def test_unknown_variant_names_the_choices():
    with pytest.raises(ParameterError, match="unknown variant 'mian'") as err:
        data.sample_set("mian")
    assert "base, main, full" in err.value.fix


def test_corrupt_file_is_refused(tmp_path):
    bad = tmp_path / "captions_source.tsv"
    shutil.copy(data.asset_path(data.CAPTIONS_FILE), bad)
    with open(bad, "a") as fh:
        fh.write("tampered\n")
    with pytest.raises(DataError, match="is corrupt"):
        data.load_captions(bad)
    with pytest.raises(DataError, match="is missing"):
        data.load_latents(tmp_path / "latents.pt")


def test_sample_list_round_trips_through_the_run_directory(tmp_path):
    samples = data.sample_set("base")
    samples.save(tmp_path)
    back = data.read_sample_set(tmp_path)
    assert back.variant == "base" and back.captions == samples.captions
    assert back.table["id"].tolist() == samples.table["id"].tolist()


def test_missing_sample_list_says_what_a_run_directory_is(tmp_path):
    with pytest.raises(DataError, match="not a run directory"):
        data.read_sample_set(tmp_path)


def test_compliance_ids_come_from_the_checker_for_each_round():
    from sccsdxl.rounds import compliance_ids

    assert compliance_ids("v4.1") == [4655, 2569, 1303, 109, 4509, 3009, 2179, 1826, 2094, 3340]
    assert compliance_ids("v5.0") == [4459, 4015, 2705, 1682, 4048, 4683, 3757, 1578, 3319, 95]  # checker, not file
    assert compliance_ids("v6.1") == [4475, 3627, 1046, 4937, 3867, 1671, 3789, 1206, 4111, 3093]
