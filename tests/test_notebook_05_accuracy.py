"""05_accuracy end to end on the CPU: a fresh tiny accuracy run scored with stand-in metric models (params/ci.yaml)."""
import json
import re
from pathlib import Path

import nbformat
import pytest

from sccsdxl.accuracy import ACCURACY_LOG, STANDIN_TAG
from sccsdxl.data import read_sample_set, sha256_of
from sccsdxl.record import read_record

pytestmark = pytest.mark.notebook


def test_notebook_makes_and_scores_an_accuracy_run_and_says_the_scores_are_fake(run_notebook):
    out, output_dir = run_notebook("05_accuracy", metric_models="standin", metrics_batch_size=10)
    record = read_record(output_dir, "05_accuracy")
    assert record["standin"] is True and "NOT real" in record["warning"]
    assert record["images"] == 50 and record["fid_comparable"] is False and record["passes"] is False
    assert record["valid_for_accuracy"] is False and record["round"] == "v4.1"

    run_dir = Path(record["run_dir"])
    assert run_dir.parent == output_dir / "runs"
    accuracy_txt = Path(record["accuracy_txt"])
    assert accuracy_txt.parent == run_dir / "accuracy" and STANDIN_TAG in accuracy_txt.name
    lines = accuracy_txt.read_text().splitlines()
    assert lines[0].startswith("# STAND-IN")
    assert re.match(r"^Accuracy Results: \{'FID_SCORE': -?[\d.]+, 'CLIP_SCORE': -?[\d.]+\}$", lines[1])  # v4.1: bare
    assert lines[2] == f"hash={sha256_of(run_dir / 'accuracy' / ACCURACY_LOG)}"

    scores = json.loads(Path(record["scores_json"]).read_text())
    samples = read_sample_set(run_dir)
    assert sorted(s["qsl_idx"] for s in scores["per_sample"]) == list(range(50))
    assert all(s["caption"] == samples.caption(s["qsl_idx"]) for s in scores["per_sample"])
    assert (Path(record["files"]["images_dir"]) / "captions.txt").is_file()  # no v4.1 id below 50: empty list

    shown = json.dumps([o for c in nbformat.read(out, as_version=4).cells if c.cell_type == "code" for o in c.outputs])
    assert "STAND-IN METRIC MODELS" in shown and "image/png" in shown
