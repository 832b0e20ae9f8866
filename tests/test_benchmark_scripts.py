"""benchmarks/ab_h200.sh and summarize_ab.py: the GPU A/B's spec checks and its table (the runs themselves need a GPU;
SOURCE=tiny DEVICE=cpu CONFIG=fp32: runs it on the CPU in about a minute and a half)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("spec,message", [
    ("base:base:2:265", "is not NAME:RUN_DIR:SWITCHES:REPEATS:SECONDS"),  # the switches' field left out
    ("base:base::two:265", "is not NAME:RUN_DIR:SWITCHES:REPEATS:SECONDS"),
    (":base::2:265", "is not NAME:RUN_DIR:SWITCHES:REPEATS:SECONDS"),
    ("x:x:CONV_MORE_TILES=1:2:265", "is not SCCSDXL_NAME=VALUE"),
    ("x:x::2:265:fp8 projections", "is not NAME:RUN_DIR:SWITCHES:REPEATS:SECONDS[:OPTIONS]"),
    ("x:x::2:265:a:b", "is not NAME:RUN_DIR:SWITCHES:REPEATS:SECONDS[:OPTIONS]"),
])
def test_a_bad_spec_is_refused_before_anything_runs(spec, message, tmp_path):
    done = subprocess.run(["bash", "benchmarks/ab_h200.sh", str(tmp_path / "out"), "ok:ok::1:10", spec], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and message in done.stderr and spec in done.stderr
    assert not (tmp_path / "out").exists()  # refused before the first build


def test_the_table_has_a_line_per_process_and_each_switches_mean(tmp_path):
    def row(speed: float, warmup: float) -> str:
        power = {"joules_per_sample": 270.0, "gpus": [{"mean_sm_mhz": 1560}]}
        return json.dumps({"samples_per_second": speed, "valid": True, "gpu_power": power, "peak_gpu_bytes": 2**30,
                           "warmup_seconds": warmup})
    (tmp_path / "base.jsonl").write_text(row(2.50, 200.0) + "\n" + row(2.52, 20.0) + "\n")
    (tmp_path / "new.jsonl").write_text(row(2.56, 230.0) + "\n")
    (tmp_path / "base2.jsonl").write_text(row(2.51, 30.0) + "\n")
    (tmp_path / "more.jsonl").write_text(row(2.58, 60.0) + "\n")
    specs = ["base:base::2:265", "new:new:SCCSDXL_X=1:2:300", "base2:base::2:200", "gone:gone::1:10",
             "more:base:SCCSDXL_X=1:1:200:fp8_projections,vae_slicing=5"]
    done = subprocess.run([sys.executable, "benchmarks/summarize_ab.py", *specs, "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=True)
    lines = done.stdout.splitlines()
    assert "| base | none | 2.500, 2.520 | 270.0, 270.0 | 1560, 1560 | 200.0 | 1.00 |" in lines
    assert "| gone | none | no run finished (see gone.txt) | | | | |" in lines
    assert "| none | 3 | 2.510 | 2.500-2.520 |" in lines and "| SCCSDXL_X=1 | 1 | 2.560 | 2.560-2.560 |" in lines
    # options added to CONFIG's: a configuration of its own, apart from the same switches without them
    assert "| SCCSDXL_X=1, +fp8_projections,vae_slicing=5 | 1 | 2.580 | 2.580-2.580 |" in lines


def test_the_h200_parameter_files_fastest_entry_is_the_benchmarks_fastest_configuration():
    """params/h200.yaml ends with what benchmarks/fastest_h200.env names the fastest ($FP), and every option in it
    is one sccsdxl.quant knows: the two must not drift apart when a session finds a faster one."""
    import yaml

    from sccsdxl import quant

    fastest = subprocess.run(["bash", "-c", ". benchmarks/fastest_h200.env && echo \"bf16:$FP\""], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.strip()
    configs = yaml.safe_load((ROOT / "params" / "h200.yaml").read_text())["configs"]
    assert configs[-1] == fastest
    quant.parse_config(fastest)  # raises on an option it does not know
