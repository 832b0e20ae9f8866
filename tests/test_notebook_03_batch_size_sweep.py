"""03_batch_size_sweep end to end on the CPU with params/ci.yaml and a two-point sweep."""
import json
from pathlib import Path

import pytest
import yaml

from sccsdxl.params import NOTEBOOK_PARAMETERS

pytestmark = pytest.mark.notebook


@pytest.fixture(scope="module")
def swept(tmp_path_factory, ci_params):
    from conftest import execute_notebook

    work = tmp_path_factory.mktemp("nb03")
    _, output_dir = execute_notebook("03_batch_size_sweep", work, {**ci_params, "output_dir": str(work / "output"),
                                                                    "batch_sizes": [8, 4], "warmup_batches": 0})
    return json.loads((output_dir / "03_batch_size_sweep.json").read_text()), output_dir


def test_every_batch_size_is_a_valid_performance_run(swept):
    record, _ = swept
    points = record["points"]
    found = [(p["batch_size"], p["gpus"], p["status"], p["valid"]) for p in points]
    assert found == [(4, 1, "ok", True), (8, 1, "ok", True)]
    for point in points:
        assert point["samples_per_second"] > 0 and point["peak_memory_bytes"] is None  # CPU: no GPU memory
        summary = Path(point["run_dir"], "performance", "mlperf_log_summary.txt").read_text()
        assert "Result is : VALID" in summary and "samples_per_query : 50" in summary
    assert record["batch_sizes"] == [4, 8] and record["gpus"] == [1]


def test_best_point_is_written_as_a_parameter_file(swept):
    record, output_dir = swept
    best = record["best"]
    assert best["samples_per_second"] == max(p["samples_per_second"] for p in record["points"])
    tuned = yaml.safe_load((output_dir / "tuned.yaml").read_text())
    assert tuned["batch_size"] == best["batch_size"] and tuned["model_source"] == "tiny" and tuned["dtype"] == "fp32"
    assert set(tuned) <= set(NOTEBOOK_PARAMETERS["02_baseline"])
    assert record["tuned_yaml"] == str(output_dir / "tuned.yaml") and record["previous_tuned_yaml"] is None


def test_points_are_saved_for_a_resume_and_plotted(swept):
    record, _ = swept
    sweep_dir = Path(record["sweep_dir"])
    lines = (sweep_dir / "points.jsonl").read_text().splitlines()
    assert [json.loads(line)["batch_size"] for line in lines] == [4, 8]
    assert Path(record["plot"]).is_file() and Path(record["plot"]).parent == sweep_dir
