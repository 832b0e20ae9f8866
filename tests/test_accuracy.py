"""Accuracy scoring: the hex log, caption alignment, the CLIP/FID arithmetic, output files and bad input."""
from __future__ import annotations

import hashlib
import json
import re
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from sccsdxl import accuracy as acc
from sccsdxl.data import SampleSet, load_captions, read_sample_set, sha256_of
from sccsdxl.errors import DataError, DeviceError, KitError, ModelError, ParameterError

# The checkers' patterns (mlperf-sdxl.md §5): v4.1 wants one whitespace and a bare number; HEAD (v5.0+) allows
# more spaces and optional quotes; both need a hash= line.
V41_PATTERNS = {"FID_SCORE": r".*'FID_SCORE':\s([\d.]+).*", "CLIP_SCORE": r".*'CLIP_SCORE':\s([\d.]+).*"}
HEAD_PATTERNS = {"FID_SCORE": r".*'FID_SCORE':\s+'?([\d.]+).*", "CLIP_SCORE": r".*'CLIP_SCORE':\s+'?([\d.]+).*"}
HASH_PATTERN = r"^hash=([\w\d]+)$"

SIDE = 32  # synthetic images: 32x32x3


def write_log(path: Path, entries: list[tuple[int, np.ndarray]]) -> Path:
    """A loadgen-style accuracy log: [{seq_id, qsl_idx, data (hex)}], with loadgen's trailing newline."""
    items = [{"seq_id": seq, "qsl_idx": int(idx), "data": image.tobytes().hex()} for seq, (idx, image) in enumerate(entries)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(items, indent=0) + "\n")
    return path


def make_run(root: Path, rows: list[int], log_indices: list[int] | None = None, seed: int = 0):
    """A run directory (samples.tsv for the given caption rows, run.json, accuracy log); returns (dir, images by qsl_idx)."""
    captions = load_captions()
    table = pd.DataFrame({"qsl_idx": range(len(rows)), "source_row": rows, "id": captions["id"].iloc[rows].to_numpy(),
                          "image_id": captions["image_id"].iloc[rows].to_numpy(),
                          "caption": captions["caption"].iloc[rows].to_numpy()})
    root.mkdir(parents=True)
    SampleSet("custom", table).save(root)
    (root / "run.json").write_text(json.dumps({"results": {}, "config": {"model_source": "tiny"},
                                               "valid_for_accuracy": False}))
    rng = np.random.default_rng(seed)
    images = {i: rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8) for i in range(len(rows))}
    order = log_indices if log_indices is not None else list(range(len(rows)))
    write_log(root / "accuracy" / acc.ACCURACY_LOG, [(i, images.get(i, images[0])) for i in order])
    return root, images


@pytest.fixture(scope="module")
def standin_files(tmp_path_factory):
    return acc.make_standin_metric_files(tmp_path_factory.mktemp("standin"))


@pytest.fixture(scope="module")
def models(standin_files):
    return acc.load_metric_models(standin_files, "cpu")


# Rows that are not positions 0..N-1, out of order: a subset whose qsl_idx and caption-file row differ.
SUBSET_ROWS = [4321, 17, 2500, 999, 3, 4999, 1200, 42]


@pytest.fixture(scope="module")
def scored(tmp_path_factory, models):
    """One subset run scored once (qsl 2 repeated with other pixels: the first entry must win)."""
    root = tmp_path_factory.mktemp("scored") / "run"
    run_dir, images = make_run(root, SUBSET_ROWS, log_indices=[3, 0, 2, 1, 2, 4, 5, 6, 7])
    log = run_dir / "accuracy" / acc.ACCURACY_LOG
    entries = json.loads(log.read_text())
    entries[4]["data"] = np.zeros((SIDE, SIDE, 3), np.uint8).tobytes().hex()  # the repeat of qsl 2 differs
    log.write_text(json.dumps(entries) + "\n")
    captured = {}
    original = acc.feature_statistics

    def capture(features):
        captured["features"] = np.array(features)
        return original(features)

    acc.feature_statistics = capture
    try:
        result = acc.score_run(run_dir, models, "v5.0", grid=3, show_progress=False)
    finally:
        acc.feature_statistics = original
    return run_dir, images, result, captured["features"]


# ------------------------------------------------------------------------------------------ the hex log

def test_decode_image_round_trips_and_rejects_wrong_sizes():
    image = np.random.default_rng(1).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    assert np.array_equal(acc.decode_image(image.tobytes().hex(), (4, 6, 3)), image)
    square = image[:4, :4]
    assert np.array_equal(acc.decode_image(np.ascontiguousarray(square).tobytes().hex()), square)
    with pytest.raises(DataError) as err:
        acc.decode_image(image.tobytes().hex(), (5, 6, 3))
    assert err.value.fix


def test_log_streams_first_entry_per_qsl_idx_and_hashes_the_whole_file(tmp_path):
    a, b, c = (np.full((SIDE, SIDE, 3), v, np.uint8) for v in (10, 20, 30))
    log = write_log(tmp_path / acc.ACCURACY_LOG, [(1, a), (0, b), (1, c)])
    digest = hashlib.sha256()
    got = list(acc.iter_accuracy_log(log, digest=digest))
    assert [i for i, _ in got] == [1, 0]
    assert np.array_equal(got[0][1], a)  # the repeat (c) is skipped
    assert digest.hexdigest() == hashlib.sha256(log.read_bytes()).hexdigest() == sha256_of(log)


@pytest.mark.parametrize("damage", ["truncated", "not_json", "bad_hex", "no_data_key", "mixed_sizes", "missing"])
def test_damaged_logs_stop_with_one_clear_message(tmp_path, damage):
    images = [(i, np.full((SIDE, SIDE, 3), i, np.uint8)) for i in range(3)]
    log = write_log(tmp_path / acc.ACCURACY_LOG, images)
    text = log.read_text()
    if damage == "truncated":
        log.write_text(text[: len(text) // 2])
    elif damage == "not_json":
        log.write_text("this is not a loadgen log")
    elif damage == "bad_hex":
        log.write_text(text.replace(images[1][1].tobytes().hex()[:8], "zzzzzzzz", 1))
    elif damage == "no_data_key":
        log.write_text(json.dumps([{"seq_id": 0, "qsl_idx": 0}]))
    elif damage == "mixed_sizes":
        write_log(log, [images[0], (1, np.zeros((SIDE * 2, SIDE * 2, 3), np.uint8))])
    else:
        log.unlink()
    with pytest.raises(DataError) as err:
        list(acc.iter_accuracy_log(log))
    assert err.value.problem and err.value.fix


def test_streaming_keeps_memory_far_below_the_decoded_images(tmp_path):
    """200 images of 192x192 (22 MB decoded): the scoring loop must never hold them all."""
    side, count = 192, 200
    rows = list(range(count))
    captions = load_captions()
    table = pd.DataFrame({"qsl_idx": rows, "source_row": rows, "id": captions["id"].iloc[rows].to_numpy(),
                          "image_id": captions["image_id"].iloc[rows].to_numpy(),
                          "caption": captions["caption"].iloc[rows].to_numpy()})
    samples = SampleSet("custom", table)
    rng = np.random.default_rng(2)
    log = write_log(tmp_path / "big.json", [(i, rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for i in rows])
    decoded_total = count * side * side * 3

    class CheapClip:
        def scores(self, images, captions):
            return [0.0 for _ in images]

    cheap = acc.MetricModels(CheapClip(), None, np.zeros(4), np.eye(4), "cpu",
                             acc.MetricFiles(Path("c"), Path("i"), Path("s"), fid_dims=4))
    original = acc.inception_features
    acc.inception_features = lambda model, images, device: rng.normal(size=(len(images), 4))
    small = write_log(tmp_path / "small.json", [(0, np.zeros((side, side, 3), np.uint8)), (1, np.ones((side, side, 3), np.uint8))])
    try:
        acc.evaluate_log(small, SampleSet("custom", table.iloc[:2]), cheap, show_progress=False)  # lazy imports first
        tracemalloc.start()
        baseline = tracemalloc.get_traced_memory()[0]
        result = acc.evaluate_log(log, samples, cheap, show_progress=False)
        peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()
        acc.inception_features = original
    assert result.n_images == count
    assert peak < decoded_total / 5, f"peak {peak:,} B vs {decoded_total:,} B of images"


# ------------------------------------------------------------------------------------------ arithmetic

def test_frechet_distance_of_known_gaussians():
    rng = np.random.default_rng(3)
    dims = 6
    basis = rng.normal(size=(dims, dims))
    sigma = basis @ basis.T + np.eye(dims)
    mu = rng.normal(size=dims)
    assert acc.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)
    shift = rng.normal(size=dims)
    assert acc.frechet_distance(mu, sigma, mu + shift, sigma) == pytest.approx(float(shift @ shift), rel=1e-8)
    d1, d2 = rng.uniform(0.5, 2.0, dims), rng.uniform(0.5, 2.0, dims)
    closed_form = float(shift @ shift + np.sum(d1 + d2 - 2 * np.sqrt(d1 * d2)))
    assert acc.frechet_distance(mu, np.diag(d1), mu + shift, np.diag(d2)) == pytest.approx(closed_form, rel=1e-10)


def test_feature_statistics_are_mean_and_unbiased_covariance():
    features = np.random.default_rng(4).normal(size=(7, 3)).astype(np.float32)
    mu, sigma = acc.feature_statistics(features)
    centered = features.astype(np.float64) - features.astype(np.float64).mean(axis=0)
    assert np.allclose(mu, features.astype(np.float64).sum(axis=0) / 7)
    assert np.allclose(sigma, centered.T @ centered / 6)
    assert sigma.dtype == np.float64


def test_clip_score_is_100_times_cosine_of_the_features(models):
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 56, 3), dtype=np.uint8)) for i in range(3)]
    captions = ["a red bus", "two cats on a sofa", "a plate of food"]
    scorer = models.clip
    got = scorer.scores(images, captions)
    with torch.no_grad():
        for image, caption, score in zip(images, captions, got):
            u = scorer.model.encode_image(scorer.preprocess(image)[None]).double()[0]
            v = scorer.model.encode_text(scorer.tokenizer([caption])).double()[0]
            by_hand = 100 * float(torch.dot(u, v) / (torch.linalg.norm(u) * torch.linalg.norm(v)))
            assert score == pytest.approx(by_hand, abs=1e-4)
    # one pair per call is what the script does; the batch gives the same numbers up to float32 rounding
    assert [scorer.scores([i], [c])[0] for i, c in zip(images, captions)] == pytest.approx(got, abs=1e-4)


# ------------------------------------------------------------------------------------------ one scored run

def test_end_to_end_equals_a_straightforward_computation(scored, models):
    """The streamed scores equal the script's algorithm done by hand: per image, batch 1, captions by source row."""
    from torchvision import transforms

    run_dir, images, result, features = scored
    captions = load_captions()["caption"]
    order = [3, 0, 2, 1, 4, 5, 6, 7]  # log order of first occurrences
    assert result.per_sample["qsl_idx"].tolist() == order
    clip_by_hand, feats_by_hand = [], []
    with torch.no_grad():
        for idx in order:
            pil = Image.fromarray(images[idx]).convert("RGB")
            caption = captions.iloc[SUBSET_ROWS[idx]]
            u = models.clip.model.encode_image(models.clip.preprocess(pil)[None]).float()
            u /= u.norm(dim=-1, keepdim=True)
            v = models.clip.model.encode_text(models.clip.tokenizer([caption])).float()
            v /= v.norm(dim=-1, keepdim=True)
            clip_by_hand.append(100 * (u @ v.T).item())
            pred = models.inception(transforms.ToTensor()(pil)[None])[0]
            feats_by_hand.append(torch.nn.functional.adaptive_avg_pool2d(pred, (1, 1)).squeeze().numpy())
    assert result.per_sample["clip"].tolist() == clip_by_hand
    assert result.clip_score == float(np.mean(clip_by_hand))
    assert np.array_equal(features, np.array(feats_by_hand, dtype=np.float64))
    mu, sigma = np.mean(features, axis=0), np.cov(features, rowvar=False)
    from pytorch_fid.fid_score import calculate_frechet_distance

    assert result.fid_score == float(calculate_frechet_distance(models.mu_ref, models.sigma_ref, mu, sigma))


def test_captions_come_from_the_runs_samples_not_from_row_positions(scored):
    _, _, result, _ = scored
    captions = load_captions()["caption"]
    by_qsl = result.per_sample.set_index("qsl_idx")
    for idx, row in enumerate(SUBSET_ROWS):
        assert by_qsl.loc[idx, "caption"] == captions.iloc[row]
        assert by_qsl.loc[idx, "source_row"] == row
    positional = [captions.iloc[i] for i in range(len(SUBSET_ROWS))]
    assert sum(a == b for a, b in zip(by_qsl.sort_index()["caption"], positional)) == 0


def test_scored_run_writes_round_format_hash_and_loud_standin_marks(scored):
    run_dir, _, result, _ = scored
    files = {k: Path(v) for k, v in result.files.items()}
    assert files["accuracy_txt"].name == f"accuracy-{acc.STANDIN_TAG}.txt"
    text = files["accuracy_txt"].read_text()
    assert "NOT real" in text
    lines = text.splitlines()
    log_hash = sha256_of(run_dir / "accuracy" / acc.ACCURACY_LOG)
    assert any(re.match(HASH_PATTERN, line) and line == f"hash={log_hash}" for line in lines)
    scores = json.loads(files["scores_json"].read_text())
    assert scores["standin"] is True and "NOT real" in scores["warning"] and scores["round"] == "v5.0"
    assert len(scores["per_sample"]) == 8 and scores["log_sha256"] == log_hash
    assert not result.passes and result.table().loc["CLIP_SCORE", "verdict"].startswith("NOT REAL")
    assert any("NOT comparable" in note for note in result.notes())
    assert [t[0] for t in result.thumbnails] == [0, 2, 3]  # first three of the log, shown in qsl order


@pytest.mark.parametrize("quoted", [False, True])
def test_accuracy_txt_matches_the_checker_of_its_round(quoted):
    fid, clip = 23.909064176163497, 31.749353325665
    text = acc.accuracy_txt(fid, clip, "ab" * 32, quoted)
    results_line, hash_line = text.splitlines()
    assert results_line.startswith("Accuracy Results: {'FID_SCORE': ")
    assert re.match(HASH_PATTERN, hash_line)
    for key, value in (("FID_SCORE", fid), ("CLIP_SCORE", clip)):
        head = re.match(HEAD_PATTERNS[key], results_line)
        assert head and float(head.group(1)) == value
        v41 = re.match(V41_PATTERNS[key], results_line)
        assert bool(v41) != quoted  # the v4.1 checker cannot read quoted numbers
        if v41:
            assert float(v41.group(1)) == value
    assert (results_line.count("'") == 8) == quoted


def test_accuracy_txt_format_follows_the_round():
    from sccsdxl.rounds import get_round

    assert get_round("v4.1").accuracy_quoted is False and get_round("v5.0").accuracy_quoted is True
    assert "'FID_SCORE': 1.5," in acc.format_accuracy_line(1.5, 2.5, quoted=False)
    assert "'FID_SCORE': '1.5'," in acc.format_accuracy_line(1.5, 2.5, quoted=True)


def test_compliance_images_and_never_overwriting(tmp_path, models, monkeypatch):
    import sccsdxl.rounds

    monkeypatch.setattr(sccsdxl.rounds, "compliance_ids", lambda name: [2, 0, 4000])
    run_dir, images = make_run(tmp_path / "run", [10, 11, 12, 13])
    first = acc.score_run(run_dir, models, "v4.1", batch_size=4, show_progress=False)
    first_text = Path(first.files["accuracy_txt"]).read_text()
    second = acc.score_run(run_dir, models, "v4.1", batch_size=4, show_progress=False)
    assert Path(first.files["accuracy_txt"]).read_text() == first_text
    assert first.files["accuracy_txt"] != second.files["accuracy_txt"]
    assert second.files["accuracy_txt"].endswith(f"accuracy-{acc.STANDIN_TAG}-2.txt")
    images_dir = Path(first.files["images_dir"])
    assert first.compliance_saved == [0, 2]  # 4000 is not in a 4-sample run
    assert sorted(p.name for p in images_dir.iterdir()) == ["0.png", "2.png", "captions.txt"]
    assert np.array_equal(np.asarray(Image.open(images_dir / "2.png")), images[2])
    captions = load_captions()["caption"]
    assert (images_dir / "captions.txt").read_text() == f"0  {captions.iloc[10]}\n2  {captions.iloc[12]}\n"
    # batch 4 gives the batch-1 numbers on the CPU up to float32 rounding
    single = acc.evaluate_log(run_dir / "accuracy" / acc.ACCURACY_LOG, read_sample_set(run_dir), models,
                              show_progress=False)
    assert single.clip_score == pytest.approx(first.clip_score, abs=1e-4)


def test_official_names_are_plain(tmp_path):
    names = acc.reserve_output_names(tmp_path, standin=False)
    assert (names["accuracy_txt"].name, names["scores_json"].name, names["images_dir"].name) == \
        ("accuracy.txt", "scores.json", "images")
    assert acc.reserve_output_names(tmp_path, standin=False)["accuracy_txt"].name == "accuracy-2.txt"


# ------------------------------------------------------------------------------------------ bad input

def test_log_from_a_bigger_variant_is_refused(tmp_path, models):
    run_dir, _ = make_run(tmp_path / "run", [0, 1, 2], log_indices=[0, 1, 2, 3])
    with pytest.raises(DataError, match="qsl_idx 3") as err:
        acc.score_run(run_dir, models, show_progress=False)
    assert err.value.fix
    assert not list((run_dir / "accuracy").glob("images*")), "a failed scoring leaves nothing behind"


def test_log_with_fewer_images_than_samples_is_refused(tmp_path, models):
    run_dir, _ = make_run(tmp_path / "run", [0, 1, 2, 3], log_indices=[0, 1, 2])
    with pytest.raises(DataError, match="3 unique images") as err:
        acc.score_run(run_dir, models, show_progress=False)
    assert err.value.fix


def test_run_without_accuracy_log_is_refused(tmp_path, models):
    run_dir, _ = make_run(tmp_path / "run", [0, 1])
    (run_dir / "accuracy" / acc.ACCURACY_LOG).unlink()
    with pytest.raises(DataError, match="no accuracy-mode run"):
        acc.score_run(run_dir, models, show_progress=False)
    with pytest.raises(DataError, match="accuracy mode never ran"):
        acc.open_run(None, str(run_dir))


@pytest.mark.parametrize("which", ["clip", "inception", "fid_stats"])
def test_missing_metric_files_say_how_to_fetch_them(standin_files, tmp_path, which):
    from dataclasses import replace

    files = replace(standin_files, **{which: tmp_path / "absent.file"})
    expected = DataError if which == "fid_stats" else ModelError
    with pytest.raises(expected) as err:
        acc.load_metric_models(files)
    assert "not found" in err.value.problem and acc.ASSET_NAMES[which] in err.value.fix


@pytest.mark.parametrize("which", ["clip", "inception", "fid_stats"])
def test_corrupt_metric_files_are_named(standin_files, tmp_path, which):
    from dataclasses import replace

    bad = tmp_path / "bad.bin"
    if which == "fid_stats":
        np.savez(bad, mu=np.zeros(3))  # no sigma
        bad = bad.with_suffix(".bin.npz")
    else:
        bad.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(KitError) as err:
        acc.load_metric_models(replace(standin_files, **{which: bad}))
    assert str(bad) in err.value.problem and err.value.fix


def test_fid_statistics_of_the_wrong_size_are_refused(tmp_path):
    path = tmp_path / "small.npz"
    np.savez(path, mu=np.zeros(8), sigma=np.eye(8))
    with pytest.raises(DataError, match="expected"):
        acc.load_fid_stats(path)


def test_parameter_choices(tmp_path):
    with pytest.raises(ParameterError):
        acc.metric_files_for("real", "data", tmp_path)
    with pytest.raises(ParameterError):
        acc.resolve_metrics_device("tpu")
    for bad in (0, True, 1.5):
        with pytest.raises(ParameterError, match="metrics_batch_size"):
            acc.check_metric_parameters("standin", "cpu", bad)
    assert acc.check_metric_parameters("official", "cpu", 4) == "cpu"
    if not torch.cuda.is_available():
        assert acc.resolve_metrics_device("auto") == "cpu"
        with pytest.raises(DeviceError):
            acc.resolve_metrics_device("cuda")


def test_official_files_come_from_the_asset_store(monkeypatch, tmp_path):
    import sys
    import types

    asked = []

    def require(name, data_dir):
        asked.append((name, data_dir))
        if name == "fid_stats_val2014" and data_dir == "empty":
            raise DataError(f"{name} is missing", "fetch it")
        return tmp_path / name

    monkeypatch.setitem(sys.modules, "sccsdxl.assets", types.SimpleNamespace(require=require))
    files = acc.metric_files_for("official", "data", tmp_path)
    assert (files.clip.name, files.inception.name, files.fid_stats.name) == \
        ("clip_vit_b32_openai", "inception_fid", "fid_stats_val2014")
    assert not files.standin and files.fid_dims == 2048 and files.clip_arch is None
    with pytest.raises(DataError, match="missing"):
        acc.official_metric_files("empty")


def test_official_files_missing_from_the_data_dir_name_the_fetch_command(tmp_path):
    with pytest.raises(DataError) as err:
        acc.metric_files_for("official", str(tmp_path / "empty"), tmp_path)
    assert "clip_vit_b32_openai" in err.value.problem and "fetch" in err.value.fix


def test_open_run_reads_an_existing_run(tmp_path):
    run_dir, _ = make_run(tmp_path / "run", [0, 1])
    assert acc.open_run(None, str(run_dir)).run_dir == run_dir


# ------------------------------------------------------------------------------------------ the official shapes

def test_official_inception_is_pytorch_fids_pool3_module(standin_files):
    """With dims 2048 the loader returns pytorch-fid's own InceptionV3 (FID blocks), giving 2048 pool3 features."""
    from pytorch_fid.inception import FIDInceptionA, FIDInceptionE_2, InceptionV3

    model = acc.load_inception(standin_files.inception, "cpu", acc.FID_DIMS)
    assert isinstance(model, InceptionV3) and model.resize_input and model.normalize_input
    modules = list(model.modules())
    assert any(isinstance(m, FIDInceptionA) for m in modules) and any(isinstance(m, FIDInceptionE_2) for m in modules)
    image = Image.fromarray(np.zeros((16, 16, 3), np.uint8))
    assert acc.inception_features(model, [image], "cpu").shape == (1, 2048)


def test_clip_loader_uses_quickgelu_vit_b32_with_the_openai_preprocess(models):
    from open_clip.transformer import QuickGELU

    scorer = models.clip
    assert any(isinstance(m, QuickGELU) for m in scorer.model.modules())
    steps = [type(t).__name__ for t in scorer.preprocess.transforms]
    assert steps[:2] == ["Resize", "CenterCrop"] and scorer.preprocess.transforms[0].size == 224
    assert scorer.tokenizer(["a cat"]).shape == (1, 77)


def test_reference_precision_restores_torch_settings():
    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    torch.set_float32_matmul_precision("high")
    try:
        with acc.reference_precision():
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before[0])


def test_clip_distribution_plot(scored):
    import matplotlib

    matplotlib.use("Agg")
    _, _, result, _ = scored
    fig = acc.plot_clip_distribution(result)
    assert "NOT REAL" in fig.axes[0].get_title()
    assert len(fig.axes[0].patches) > 1
