"""06_submission's package: the tree, the structural check, packing, the SCC artifacts, the checker, pushing."""
import hashlib
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

from sccsdxl import accuracy as A
from sccsdxl import submission as S
from sccsdxl.data import read_sample_set, sha256_of
from sccsdxl.errors import KitError, ParameterError
from sccsdxl.harness import RunConfig, run_benchmark
from sccsdxl.record import write_record
from sccsdxl.rounds import compliance_ids, get_round

SIDE = 16  # 16x16 images: 50 of them make a 77 KB accuracy log, so the truncation is exercised


class FakeGenerator:
    """Deterministic 16x16 images per prompt (a different ``salt`` gives different images)."""

    response_shape = (SIDE, SIDE, 3)

    def __init__(self, salt: int = 0):
        self.salt = salt
        self.lock = threading.Lock()

    def generate(self, prompts):
        digests = [hashlib.sha256(f"{self.salt}:{p}".encode()).digest() for p in prompts]
        return np.stack([np.random.default_rng(int.from_bytes(d[:8], "little")).integers(0, 256, self.response_shape,
                                                                                          dtype=np.uint8)
                         for d in digests])


def make_run(output_dir: Path, modes=("performance", "accuracy"), generator=None, **overrides):
    config = RunConfig(**{"variant": "base", "model_source": "tiny", "dtype": "fp32", "device": "cpu", "batch_size": 8,
                          "output_dir": str(output_dir), "warmup_batches": 0, **overrides})
    return run_benchmark(config, modes=modes, generator=generator or FakeGenerator(), show_progress=False)


def record_baseline(output_dir: Path, run) -> None:
    """The record 02_baseline writes."""
    perf = run.result("performance") or {}
    write_record(output_dir, "02_baseline", {
        "run_dir": str(run.run_dir), "config": run.record["config"],
        "samples_per_second": perf.get("samples_per_second"),
        "valid": perf.get("valid"), "samples": run.record["samples"], "valid_for_accuracy": False,
        "results": run.record["results"]})


def score(run, clip: float = 31.75, fid: float = 23.5, standin: bool = False, record_dir: Path | None = None) -> Path:
    """What 05_accuracy leaves: accuracy.txt (round's format, full log's hash), images/ + captions.txt, a record."""
    rnd = get_round(run.record["round"])
    names = A.reserve_output_names(run.run_dir / "accuracy", standin)
    log = run.run_dir / "accuracy" / A.ACCURACY_LOG
    names["accuracy_txt"].write_text(A.accuracy_txt(fid, clip, sha256_of(log), rnd.accuracy_quoted, standin))
    samples = read_sample_set(run.run_dir)
    ids = [i for i in compliance_ids(rnd.name) if i < len(samples)]
    for idx in ids:
        from PIL import Image

        Image.new("RGB", (SIDE, SIDE)).save(names["images_dir"] / f"{idx}.png")
    A.write_captions(names["images_dir"], samples, ids)
    if record_dir is not None:
        write_record(record_dir, "05_accuracy", {"run_dir": str(run.run_dir), "round": rnd.name, "clip_score": clip,
                                                 "fid_score": fid, "standin": standin, "notes": [],
                                                 "accuracy_txt": str(names["accuracy_txt"]),
                                                 "parameters": {"run_dir": str(run.run_dir),
                                                                "metric_models": "standin"}})
    return names["accuracy_txt"]


def prepared(output_dir: Path, **overrides):
    """A run with both modes, recorded by 02 and scored by 05: what 06 starts from."""
    run = make_run(output_dir, **overrides)
    record_baseline(output_dir, run)
    score(run, record_dir=output_dir)
    return run


def build(output_dir: Path, submitter: str = "TestTeam", **options):
    inputs = S.find_inputs(output_dir)
    opts = S.SubmissionOptions(submitter, **{"mlperf_round": "v4.1", **options}).validate()
    return inputs, S.build_submission(inputs, opts, {"submitter": submitter})


def errors_of(report: S.CheckReport) -> str:
    return "\n".join(f"{f.where}: {f.problem}" for f in report.errors)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One open v4.1 submission built from a prepared output dir (shared by the read-only tests)."""
    out = tmp_path_factory.mktemp("sub") / "output"
    prepared(out)
    inputs, sub = build(out)
    return inputs, sub


# ------------------------------------------------------------------------------------------------ the tree

def test_build_check_pack_unpack_check_again(built, tmp_path):
    inputs, sub = built
    report = S.check_tree(sub.tree, "v4.1")
    assert report.ok, errors_of(report)
    scenario = sub.scenario_dir
    for rel in ["performance/run_1/mlperf_log_summary.txt", "performance/run_1/mlperf_log_detail.txt",
                "accuracy/mlperf_log_summary.txt", "accuracy/mlperf_log_detail.txt", "accuracy/accuracy.txt",
                "accuracy/mlperf_log_accuracy.json"]:
        assert (scenario / rel).is_file(), rel
    assert {p.name for p in (scenario / "performance" / "run_1").iterdir()} == set(S.PERF_FILES)
    measurements = sub.root / "measurements" / sub.system_id / "stable-diffusion-xl" / "Offline"
    expected = {"user.conf", "mlperf.conf", "README.md", f"{sub.system_id}.json"}
    assert expected <= {p.name for p in measurements.iterdir()}
    assert (sub.root / "code" / "stable-diffusion-xl" / "README.md").is_file()
    assert (sub.root / "code" / "stable-diffusion-xl" / "sccsdxl-kit" / "sccsdxl" / "harness.py").is_file()
    tarball = S.pack(sub)
    unpacked = S.unpack(tarball, tmp_path / "unpacked")
    assert sorted(p.name for p in unpacked.iterdir()) == ["open"]
    again = S.check_tree(unpacked, "v4.1")
    assert again.ok, errors_of(again)
    assert S.check_archive(tarball, "v4.1").ok
    with pytest.raises(KitError, match="already exists"):
        S.pack(sub)


def test_accuracy_log_is_hashed_in_full_and_only_the_copy_is_truncated(built):
    inputs, sub = built
    original = inputs.accuracy_log
    size, digest = original.stat().st_size, sha256_of(original)
    assert size > S.MAX_ACCURACY_LOG_BYTES  # the test would prove nothing otherwise
    copy = sub.scenario_dir / "accuracy" / "mlperf_log_accuracy.json"
    assert copy.stat().st_size <= S.MAX_ACCURACY_LOG_BYTES
    head = original.read_bytes()[:S.VIEWABLE_BYTES]
    assert copy.read_bytes().startswith(head) and copy.read_bytes().endswith(original.read_bytes()[-S.VIEWABLE_BYTES:])
    text = (sub.scenario_dir / "accuracy" / "accuracy.txt").read_text()
    assert f"hash={digest}" in text.splitlines()
    assert original.stat().st_size == size and sha256_of(original) == digest  # the run's log is untouched


def test_small_logs_are_copied_verbatim_and_missing_hash_is_appended(tmp_path):
    small = tmp_path / "small.json"
    small.write_text("[\n]\n")
    digest, truncated = S.truncated_copy(small, tmp_path / "out" / "copy.json")
    assert not truncated and (tmp_path / "out" / "copy.json").read_text() == "[\n]\n"
    text, found = S.accuracy_txt_with_hash("Accuracy Results: {'FID_SCORE': 23.5, 'CLIP_SCORE': 31.7}\n", digest)
    assert found is None and text.splitlines()[-1] == f"hash={digest}"


def test_system_description_has_every_required_field(built):
    from sccsdxl.system import SYSTEM_DESC_NONEMPTY_FIELDS, SYSTEM_DESC_REQUIRED_FIELDS

    _, sub = built
    desc = json.loads((sub.root / "systems" / f"{sub.system_id}.json").read_text())
    assert set(SYSTEM_DESC_REQUIRED_FIELDS) <= set(desc)
    assert all(desc[k] for k in SYSTEM_DESC_NONEMPTY_FIELDS)
    assert desc["submitter"] == "TestTeam" and desc["division"] == "open" and desc["system_type"] == "datacenter"
    assert desc["status"] in S.STATUSES and desc["accelerators_per_node"] == "0"  # CPU: "0", not an empty 0
    assert sub.system_id == "cpu_only"


def test_overrides_fill_what_detection_cannot(tmp_path):
    out = tmp_path / "output"
    prepared(out)
    _, sub = build(out, system_name="Rack 1: 4x H200 (node a)", system_overrides={
        "cooling": "liquid", "status": "preview", "weight_data_types": "fp16"})
    assert sub.system["cooling"] == "liquid" and sub.system["status"] == "preview"
    assert sub.system["system_name"] == "Rack 1: 4x H200 (node a)" and sub.system_id == "Rack_1_4x_H200_node_a"
    assert sub.implementation["weight_data_types"] == "fp16"
    assert not any("cooling" in f.problem for f in sub.build.warnings)


@pytest.mark.parametrize("overrides,message", [
    ({"submitter": "other"}, "comes from the notebook parameters"),
    ({"system_type": "edge"}, "-p category"),
    ({"colour": "blue"}, "unknown field 'colour'"),
    ({"status": "sold"}, "status 'sold' is not allowed"),
])
def test_bad_overrides_are_refused(overrides, message):
    with pytest.raises(ParameterError, match=message):
        S.SubmissionOptions("Team", system_overrides=overrides).validate()


@pytest.mark.parametrize("field,value,message", [
    ("division", "network", "unknown division"), ("category", "cloud", "unknown category"),
    ("mlperf_round", "v3.1", "unknown MLPerf round"), ("submitter", "", "no team name"),
    ("submitter", "日本語チーム", "no letters or digits"),
])
def test_bad_options_are_refused_before_anything_is_written(field, value, message):
    with pytest.raises(ParameterError, match=message):
        S.SubmissionOptions(**{"submitter": "Team", field: value}).validate()


def test_implementation_json_reflects_dtype_and_quantization():
    base = S.implementation_json({"dtype": "fp16", "model_source": "hf"})
    assert base == {"input_data_types": "fp16", "retraining": "No",
                    "starting_weights_filename": "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0",
                    "weight_data_types": "fp16", "weight_transformations": "No"}
    fp8 = S.implementation_json({"dtype": "bf16", "model_source": "hf", "optimizations": "fuse_qkv,compile,fp8"})
    assert fp8["weight_data_types"] == "fp8,bf16" and "quantization to fp8" in fp8["weight_transformations"]
    assert "bf16" in fp8["weight_transformations"] and "fused" in fp8["weight_transformations"]
    future = S.implementation_json({"dtype": "fp16", "model_source": "mlcommons",
                                    "model_path": "/m/stable_diffusion_fp16", "quant": {"weights": "int8"}})
    assert future["weight_data_types"] == "int8,fp16" and "stable_diffusion_fp16" in future["starting_weights_filename"]


def test_v6_layout_puts_measurements_and_src_where_the_current_checker_looks(tmp_path):
    out = tmp_path / "output"
    prepared(out, mlperf_round="v6.0")
    _, sub = build(out, mlperf_round="v6.0")
    assert (sub.root / "src" / "stable-diffusion-xl" / "README.md").is_file() and not (sub.root / "code").exists()
    assert not (sub.root / "measurements").exists()
    expected = {"measurements.json", "user.conf", "README.md", "mlperf.conf"}
    assert expected <= {p.name for p in sub.scenario_dir.iterdir()}
    report = S.check_tree(sub.tree, "v6.0")
    assert report.ok, errors_of(report)
    assert "'CLIP_SCORE': '" in (sub.scenario_dir / "accuracy" / "accuracy.txt").read_text()  # quoted since v5.0
    assert any("covers 50 samples" in f.problem for f in report.warnings)  # v6 dataset-size rule, open: warning


# ------------------------------------------------------------------------------------------------ untrusted names

@pytest.mark.parametrize("team", ["../../evil", "a/b/../c", "/etc/passwd", "Ünïversité de Test", "team name",
                                  "..", ".hidden", "x" * 300, "tab\tand\nnewline"], ids=lambda t: repr(t[:20]))
def test_team_name_never_writes_outside_the_output_directory(tmp_path, team):
    out = tmp_path / "work" / "output"
    prepared(out)
    before = {p for p in tmp_path.rglob("*") if not p.is_relative_to(out)}
    if team == "..":
        with pytest.raises(ParameterError, match="no letters or digits"):
            build(out, submitter=team)
        return
    inputs, sub = build(out, submitter=team)
    S.pack(sub)
    assert {p for p in tmp_path.rglob("*") if not p.is_relative_to(out)} == before
    assert sub.directory.parent == out / "submissions"
    assert all(p.resolve().is_relative_to(sub.directory.resolve()) for p in sub.directory.rglob("*"))
    name = sub.root.name
    assert name == sub.options.submitter and len(name) <= 64
    assert all(c.isascii() and (c.isalnum() or c in "_.-") for c in name) and not name.startswith(".")
    assert sub.options.notes and "is written as" in sub.options.notes[0]
    assert S.check_tree(sub.tree, "v4.1").ok


def test_building_twice_never_overwrites_an_earlier_submission(tmp_path):
    out = tmp_path / "output"
    prepared(out)
    _, first = build(out)
    marker = first.directory / "mlperf_submission.run"
    content = marker.read_text()
    _, second = build(out)
    assert first.directory != second.directory and first.directory.is_dir()
    assert marker.read_text() == content


# ------------------------------------------------------------------------------------------------ missing results

def test_nothing_made_yet_lists_both_notebooks(tmp_path):
    with pytest.raises(S.MissingResultsError) as err:
        S.find_inputs(tmp_path / "empty")
    notebooks = [m.notebook for m in err.value.missing]
    assert notebooks == ["02_baseline", "05_accuracy"]
    assert "02_baseline.ipynb" in str(err.value) and "05_accuracy.ipynb" in str(err.value)


def test_performance_only_run_lists_the_accuracy_run_and_result(tmp_path):
    out = tmp_path / "output"
    run = make_run(out, modes=("performance",))
    record_baseline(out, run)
    with pytest.raises(S.MissingResultsError) as err:
        S.find_inputs(out)
    text = str(err.value)
    assert "accuracy-mode run" in text and "accuracy result" in text
    assert {m.notebook for m in err.value.missing} == {"05_accuracy"}
    assert len(err.value.table()) == 2


def test_unscored_run_asks_for_05_accuracy_on_that_run(tmp_path):
    out = tmp_path / "output"
    run = make_run(out)
    record_baseline(out, run)
    with pytest.raises(S.MissingResultsError) as err:
        S.find_inputs(out)
    [missing] = err.value.missing
    assert missing.notebook == "05_accuracy" and str(run.run_dir) in missing.fix


def test_accuracy_only_run_asks_for_a_performance_run(tmp_path):
    out = tmp_path / "output"
    run = make_run(out, modes=("accuracy",))
    score(run)
    with pytest.raises(S.MissingResultsError) as err:
        S.find_inputs(out, run_dir=str(run.run_dir))
    assert [m.notebook for m in err.value.missing] == ["02_baseline"]
    with pytest.raises(S.MissingResultsError, match="holds no run.json"):
        S.find_inputs(out, run_dir=str(tmp_path / "nowhere"))


def test_accuracy_of_05s_own_run_is_used_when_the_configuration_matches(tmp_path):
    out = tmp_path / "output"
    perf = make_run(out, modes=("performance",))
    record_baseline(out, perf)
    acc = make_run(out, modes=("accuracy",), batch_size=4)
    score(acc, record_dir=out)
    inputs = S.find_inputs(out)
    assert inputs.accuracy_run.run_dir == acc.run_dir and inputs.perf_run.run_dir == perf.run_dir
    assert any("same configuration" in n for n in inputs.notes)
    sub = S.build_submission(inputs, S.SubmissionOptions("Team").validate())
    assert S.check_tree(sub.tree, "v4.1").ok
    record = json.loads((acc.run_dir / "run.json").read_text())  # now make 05's run another configuration
    record["config"]["dtype"] = "bf16"
    (acc.run_dir / "run.json").write_text(json.dumps(record))
    with pytest.raises(S.MissingResultsError, match="differs from the performance run in dtype"):
        S.find_inputs(out)


def test_real_scores_win_over_stand_in_scores_and_stand_ins_are_flagged(tmp_path):
    out = tmp_path / "output"
    run = make_run(out)
    record_baseline(out, run)
    fake = score(run, standin=True)
    assert S.find_inputs(out).accuracy_txt == fake
    _, sub = build(out)
    assert any("stand-in" in f.problem for f in sub.build.warnings)
    real = score(run)
    assert S.find_inputs(out).accuracy_txt == real


def test_a_hash_that_is_not_the_logs_is_an_error(tmp_path):
    out = tmp_path / "output"
    run = prepared(out)
    txt = next((run.run_dir / "accuracy").glob("accuracy*.txt"))
    txt.write_text(txt.read_text().replace("hash=", "hash=00"))
    _, sub = build(out)
    assert any("scores were computed from another log" in f.problem for f in sub.build.errors)


# ------------------------------------------------------------------------------------------------ the check

def test_the_check_lists_every_problem_at_once(tmp_path):
    out = tmp_path / "output"
    prepared(out, mlperf_round="v6.0")  # v6.0 seeds and quoted scores, checked as v4.1 below
    _, sub = build(out, mlperf_round="v6.0")
    tree, root = sub.tree, sub.root
    (tree / "open" / "notes.txt").write_text("x")  # a file in the division folder
    (tree / "stray.json").write_text("{}")  # a file at the top
    system = root / "systems" / f"{sub.system_id}.json"
    desc = json.loads(system.read_text())
    desc["cooling"], desc["status"] = "", "sold"
    system.write_text(json.dumps(desc))
    (sub.scenario_dir / "user.conf").unlink()
    (sub.scenario_dir / "accuracy" / "scores.json").write_text("{}")
    (sub.scenario_dir / "accuracy" / "mlperf_log_accuracy.json").write_bytes(b"x" * 20000)
    (root / "src" / "stable-diffusion-xl" / "has space.txt").write_text("x")
    (root / "src" / "empty").mkdir()
    report = S.check_tree(tree, "v6.0")
    text = errors_of(report)
    for expected in ["files directly in the division folder: notes.txt", "beside the division folders: stray.json",
                     "meaningful value are empty: cooling", "status 'sold'", "user.conf: missing",
                     "does not allow here: scores.json", "not truncated", "space in the name", "empty folder"]:
        assert expected in text, expected
    as_v41 = S.check_tree(tree, "v4.1")  # the same tree for the wrong round: seeds, layout, score format
    text = errors_of(as_v41)
    for expected in ["seeds are not v4.1's (they are v6.0's)", "no code/ folder", "CLIP_SCORE/FID_SCORE line"]:
        assert expected in text, expected


def test_closed_division_applies_the_full_rules(tmp_path):
    out = tmp_path / "output"
    run = make_run(out)
    record_baseline(out, run)
    score(run, clip=15.0, fid=240.0)
    _, sub = build(out, division="closed")
    report = S.check_tree(sub.tree, "v4.1")
    text = errors_of(report)
    for expected in ["samples per query is 50, closed needs >= 5000", "min_duration (ms) is 0",
                     "performance_sample_count is 50", "compliance images missing", "compliance test missing",
                     "needs scenarios Server", "accuracy outside the closed"]:
        assert expected in text, expected
    assert not any("accuracy outside" in f.problem for f in report.warnings)


def test_report_table_and_text_put_errors_first():
    report = S.CheckReport()
    report.warn("a", "look")
    report.error("b", "broken", "fix it")
    assert list(report.table()["severity"]) == ["error", "warning"]
    assert report.text().startswith("1 error(s), 1 warning(s)\nERROR: b: broken\n    fix: fix it")


# ------------------------------------------------------------------------------------------------ SCC artifacts

def test_run_script_replays_the_papermill_calls_in_order(built, tmp_path):
    inputs, sub = built
    script = Path(sub.files["run_script"])
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True)
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    log = tmp_path / "calls.txt"
    (fake_bin / "papermill").write_text(f"#!/usr/bin/env bash\necho \"$@\" >> {log}\n")
    (fake_bin / "papermill").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "SCCSDXL_DIR": str(tmp_path)}
    subprocess.run(["bash", str(script)], check=True, env=env, cwd=tmp_path)
    calls = log.read_text().splitlines()
    assert [c.split()[0] for c in calls] == ["notebooks/02_baseline.ipynb", "notebooks/05_accuracy.ipynb",
                                             "notebooks/06_submission.ipynb"]
    import yaml

    params02 = yaml.safe_load((tmp_path / calls[0].split()[-1]).read_text())
    assert params02["variant"] == "base" and params02["model_source"] == "tiny" and params02["batch_size"] == 8
    assert "02_baseline" in (sub.root / "measurements" / sub.system_id / "stable-diffusion-xl" / "Offline" /
                             "README.md").read_text()


def test_run_script_reproduces_a_run_no_record_points_to(tmp_path):
    out = tmp_path / "output"
    run = make_run(out, batch_size=4)
    score(run)
    inputs = S.find_inputs(out, run_dir=str(run.run_dir))
    commands = S.reconstruct_commands(inputs)
    assert [c.notebook for c in commands] == ["02_baseline"] and commands[0].parameters["batch_size"] == 4
    assert "reproduces run" in commands[0].note


def test_report_tells_platform_throughput_and_accuracy(built):
    inputs, sub = built
    path = S.write_report(sub, inputs, S.check_tree(sub.tree, "v4.1"))
    text = path.read_text()
    perf = inputs.perf_run.result("performance")
    assert f"**{perf['samples_per_second']} samples/s**" in text
    for expected in ["## Platform", "## How it was reached", "CLIP_SCORE 31.7500", "FID_SCORE 23.5000",
                     "## Compliance", "figures/throughput.png"]:
        assert expected in text, expected
    assert (sub.directory / "figures" / "throughput.png").is_file()


def test_report_tells_how_the_throughput_was_reached(tmp_path):
    import matplotlib.pyplot as plt

    out = tmp_path / "output"
    prepared(out)
    fig, ax = plt.subplots()
    ax.plot([1, 2])
    fig.savefig(tmp_path / "sweep.png")
    plt.close(fig)
    write_record(out, "03_batch_size_sweep", {"best": {"batch_size": 8, "gpus": 1, "samples_per_second": 2.0},
                                              "plot": str(tmp_path / "sweep.png")})
    write_record(out, "04_quantization", {"results": [{"config": "fp16:fuse_qkv", "speedup": 1.3}]})
    record = json.loads((out / "02_baseline.json").read_text())
    record.update(run_dir=str(out / "runs" / "elsewhere"), samples_per_second=1.0)  # a baseline of another run
    (out / "02_baseline.json").write_text(json.dumps(record))
    inputs = S.find_inputs(out, run_dir=str(next((out / "runs").iterdir())))
    assert [name for name, _ in S.progression(inputs)] == ["baseline (02)", "best sweep point (03)", "submitted"]
    sub = S.build_submission(inputs, S.SubmissionOptions("Team").validate())
    text = S.write_report(sub, inputs, S.CheckReport()).read_text()
    assert "- baseline (02): 1 samples/s (x1.00)" in text and "- best sweep point (03): 2 samples/s (x2.00)" in text
    assert "config fp16:fuse_qkv, speedup 1.3" in text and "01-sweep.png" in text
    assert (sub.directory / "figures" / "01-sweep.png").is_file()


def test_file_browser_shows_the_tree(built):
    pytest.importorskip("ipywidgets")
    _, sub = built
    panel = S.file_browser(sub.tree)
    assert len(panel.children[0].options) == sum(1 for p in sub.tree.rglob("*") if p.is_file())


def test_record_and_artifacts_table(built):
    inputs, sub = built
    check = S.check_tree(sub.tree, "v4.1")
    record = S.submission_record(sub, inputs, check, None, None, None, {"submitter": "TestTeam"})
    json.dumps(record)  # JSON-ready
    assert record["check"]["ok"] and record["system_id"] == sub.system_id and record["layout"] == "v4"
    assert "tree" in list(S.artifacts_table(sub)["artifact"])


# ------------------------------------------------------------------------------------------------ official checker

def fake_checker(root: Path, exit_code: int = 0, package: bool = False) -> Path:
    """A stand-in for a checkout of mlcommons/inference whose checker records its arguments."""
    tools = root / "tools" / "submission"
    body = ("import sys, pathlib\n"
            "pathlib.Path(sys.argv[sys.argv.index('--csv') + 1]).write_text('Organization\\n')\n"
            "print('args', sys.argv[1:])\n"
            f"print('SUMMARY: submission ' + ({exit_code} and 'has errors' or 'looks OK'))\n"
            f"sys.exit({exit_code})\n")
    if package:
        (tools / "submission_checker").mkdir(parents=True)
        (tools / "submission_checker" / "__init__.py").write_text("")
        (tools / "submission_checker" / "main.py").write_text(body)
    else:
        tools.mkdir(parents=True)
        (tools / "submission_checker.py").write_text(body)
    return root


@pytest.mark.parametrize("package", [False, True], ids=["v4.1-script", "modular-package"])
def test_official_checker_runs_as_a_subprocess(built, tmp_path, package):
    _, sub = built
    checker = S.run_checker(fake_checker(tmp_path / "inference", package=package), sub.tree, "v4.1", "TestTeam",
                            tmp_path)
    assert checker.passed and "SUMMARY: submission looks OK" in checker.summary()
    assert ["--version", "v4.1"] == checker.command[checker.command.index("--version"):][:2]
    assert str(sub.tree.resolve()) in checker.command and Path(checker.csv).is_file()
    assert ("-m" in checker.command) == package
    failing = S.run_checker(fake_checker(tmp_path / "bad", exit_code=1), sub.tree, "v4.1", "TestTeam", tmp_path)
    assert not failing.passed and "has errors" in failing.output


def test_a_path_without_a_checker_is_refused(tmp_path):
    with pytest.raises(ParameterError, match="holds no MLPerf submission checker"):
        S.checker_command(tmp_path, tmp_path, "v4.1", "T", tmp_path / "x.csv")


# ------------------------------------------------------------------------------------------------ push

def git(*args, cwd=None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                          env={**S._git_env(), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                               "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}).stdout


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_push_commits_the_tree_to_the_branch_of_a_local_bare_repository(built, tmp_path):
    from dataclasses import replace

    _, sub = built
    bare = tmp_path / "results.git"
    git("init", "--quiet", "--bare", str(bare))
    git("--git-dir", str(bare), "symbolic-ref", "HEAD", "refs/heads/main")  # the default branch, as on GitHub
    seed = tmp_path / "seed"
    git("init", "--quiet", str(seed))
    (seed / "open" / "OtherTeam").mkdir(parents=True)
    (seed / "open" / "OtherTeam" / "results.txt").write_text("theirs\n")
    git("add", "open", cwd=seed)
    git("commit", "--quiet", "-m", "init", cwd=seed)
    git("push", "--quiet", str(bare), "HEAD:refs/heads/main", cwd=seed)
    pushed = S.push_results(sub, str(bare))  # no such branch yet: made from the default branch
    assert pushed.pushed and pushed.branch == S.DEFAULT_BRANCH
    files = git("--git-dir", str(bare), "ls-tree", "-r", "--name-only", S.DEFAULT_BRANCH).split()
    assert f"open/TestTeam/systems/{sub.system_id}.json" in files and "open/OtherTeam/results.txt" in files
    assert any(f.endswith("accuracy/accuracy.txt") for f in files)
    assert git("--git-dir", str(bare), "rev-parse", S.DEFAULT_BRANCH).strip() == pushed.commit
    again = S.push_results(sub, str(bare))  # the branch exists now: nothing new to commit
    assert not again.pushed and again.commit == pushed.commit
    changed_root = tmp_path / "changed" / "TestTeam"
    shutil.copytree(sub.root, changed_root)
    (changed_root / "systems" / f"{sub.system_id}.json").write_text("{}\n")
    later = S.push_results(replace(sub, root=changed_root, directory=tmp_path / "changed"), str(bare))
    assert later.pushed and later.commit != pushed.commit
    files = git("--git-dir", str(bare), "ls-tree", "-r", "--name-only", S.DEFAULT_BRANCH).split()
    assert "open/OtherTeam/results.txt" in files  # other content of the branch survives
    assert git("--git-dir", str(bare), "rev-parse", "main").strip() != later.commit  # main untouched


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_push_failures_say_what_to_check_without_leaking_tokens(built, tmp_path):
    _, sub = built
    with pytest.raises(KitError, match="check the URL") as err:
        S.push_results(sub, f"https://user:s3cret@127.0.0.1:9/{tmp_path.name}.git")
    assert "s3cret" not in str(err.value)
    with pytest.raises(ParameterError, match="branch name"):
        S.push_results(sub, str(tmp_path), branch="--force")
    with pytest.raises(ParameterError, match="not a repository"):
        S.push_results(sub, "--upload-pack=evil")
