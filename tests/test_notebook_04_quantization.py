"""04_quantization end to end on the CPU with params/ci.yaml (tiny model, stand-in CLIP)."""
import json

import pytest
import yaml

pytestmark = pytest.mark.notebook


def test_configurations_are_measured_guarded_and_the_best_is_written(run_notebook, ci_params):
    out, output_dir = run_notebook("04_quantization")
    record = json.loads((output_dir / "04_quantization.json").read_text())
    rows = {row["config"]: row for row in record["rows"]}
    assert set(rows) == set(ci_params["configs"])
    for row in rows.values():
        assert row["status"] == "ok" and row["valid"] is True and row["samples_per_second"] > 0
        assert row["guard"]["clip_delta"] is not None and row["verdict"] in ("pass", "fail")
    assert rows["fp32:"]["guard"]["mean_psnr_db"] == float("inf")  # the reference against itself
    tuned = yaml.safe_load((output_dir / "quantized.yaml").read_text())
    assert tuned["dtype"] == record["chosen"]["dtype"] and tuned["optimizations"] in ("", record["chosen"]["optimizations"])
    assert record["chosen"]["verdict"] == "pass"
