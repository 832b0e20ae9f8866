"""01_setup runs headless with params/ci.yaml: no network, nothing fetched, a full report and record."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from sccsdxl import assets
from sccsdxl.params import NOTEBOOK_PARAMETERS

pytestmark = pytest.mark.notebook


def test_declared_parameters_match_the_registry():
    import papermill as pm

    notebook = Path(__file__).resolve().parents[1] / "notebooks" / "01_setup.ipynb"
    declared = list(pm.inspect_notebook(str(notebook)))
    assert declared == NOTEBOOK_PARAMETERS["01_setup"]


def test_setup_reports_machine_and_missing_assets_offline(run_notebook, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a compute node without network
    data = tmp_path / "data"
    out, output_dir = run_notebook("01_setup", data_dir=str(data))
    record = json.loads((output_dir / "01_setup.json").read_text())

    assert record["notebook"] == "01_setup" and record["data_dir"] == str(data) and record["offline"] is True
    assert record["parameters"]["dtype"] == "fp32" and record["parameters"]["model_source"] == "tiny"
    machine = record["machine"]
    assert {"python", "torch", "gpus", "cpu", "disk", "packages", "problems"} <= set(machine)
    assert machine["disk"]["checked_at"] == str(tmp_path) and machine["disk"]["needed_bytes"] > 0
    by_name = {row["asset"]: row for row in record["assets"]}
    assert set(assets.MANIFEST) <= set(by_name) and "sdxl_fp32" not in by_name  # tiny needs no weights
    for name in assets.MANIFEST:
        assert by_name[name]["state"] == "missing"
        assert by_name[name]["fetch"] == assets.fetch_command(name, data)
    assert record["ready"] == {"benchmark": True, "accuracy": False, "missing": list(assets.METRIC_ASSETS)}
    assert record["fetch"] == [] and record["captions"] is None
    assert record["latents"]["shape"] == [1, 4, 128, 128]
    assert record["fixed_settings"]["denoising steps"] == "20"
    assert not data.exists()  # reporting creates nothing
