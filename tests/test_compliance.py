"""TEST01 / TEST04: audit settings, runs through the harness, verification, and their place in the tree."""
import json
from pathlib import Path

import numpy as np
import pytest

from sccsdxl import compliance as CO
from sccsdxl import harness
from sccsdxl import submission as S
from sccsdxl.errors import DataError, ParameterError
from sccsdxl.rounds import ROUNDS
from test_submission import FakeGenerator, build, errors_of, make_run, prepared


def test_audit_configs_carry_the_official_values(tmp_path):
    import mlperf_loadgen as lg

    test01 = harness.read_conf(CO.write_audit_config("TEST01", tmp_path))
    assert test01 == {"mode": "2", "accuracy_log_rng_seed": "720381539243781796", "accuracy_log_sampling_target": "128"}
    (tmp_path / "t04").mkdir()
    test04 = harness.read_conf(CO.write_audit_config("TEST04", tmp_path / "t04"))
    assert test04 == {"mode": "2", "performance_issue_unique": "0", "performance_issue_same": "1",
                      "performance_issue_same_index": "3", "min_query_count": "500"}
    conf = tmp_path / "user.conf"
    conf.write_text(harness.user_conf_text(50, "base", 0))
    settings = harness.loadgen_settings("performance", conf, ROUNDS["v4.1"], tmp_path / "t04" / "audit.config")
    assert settings.mode == lg.TestMode.PerformanceOnly and settings.min_query_count == 500
    assert settings.performance_issue_same and settings.performance_issue_same_index == 3
    with pytest.raises(ParameterError, match="SDXL runs TEST01 and TEST04"):
        CO.write_audit_config("TEST05", tmp_path)


def summary(path: Path, score: float, valid: bool = True, scenario: str = "Offline") -> Path:
    path.write_text(f"SUT name : PySUT\nScenario : {scenario}\nMode     : PerformanceOnly\n"
                    f"Samples per second: {score}\nResult is : {'VALID' if valid else 'INVALID'}\n")
    return path


@pytest.mark.parametrize("test,score,passes", [
    ("TEST01", 105.0, True), ("TEST01", 95.0, True), ("TEST01", 111.0, False), ("TEST01", 89.0, False),
    ("TEST04", 50.0, True), ("TEST04", 109.0, True), ("TEST04", 111.0, False),
])
def test_performance_rule(tmp_path, test, score, passes):
    ok, text = CO.verify_performance(summary(tmp_path / "ref.txt", 100.0), summary(tmp_path / "t.txt", score), test)
    assert ok is passes
    assert text.splitlines()[-1] == "TEST PASS" if passes else text.splitlines()[-1].startswith("TEST FAIL")


def test_invalid_or_mismatched_runs_fail_verification(tmp_path):
    ok, text = CO.verify_performance(summary(tmp_path / "r.txt", 100, valid=False), summary(tmp_path / "t.txt", 100),
                                     "TEST01")
    assert not ok and "reference run is not VALID" in text
    ok, text = CO.verify_performance(summary(tmp_path / "r.txt", 100),
                                     summary(tmp_path / "t.txt", 100, scenario="Server"), "TEST04")
    assert not ok and "scenarios differ" in text


@pytest.fixture
def lenient(monkeypatch):
    """Fake-model runs take milliseconds, so their timing is noise: accept any score for the end-to-end tests."""
    monkeypatch.setattr(CO, "PERFORMANCE_TOLERANCE", 1000.0)


def test_both_tests_run_verify_and_land_in_the_tree(tmp_path, lenient):
    out = tmp_path / "output"
    run = prepared(out)
    results = CO.run_compliance(FakeGenerator(), run, run.run_dir / "accuracy" / "mlperf_log_accuracy.json")
    assert [r.test for r in results] == ["TEST01", "TEST04"] and all(r.passed for r in results)
    test01, test04 = (Path(r.directory) for r in results)
    assert test01 == run.run_dir / "compliance" / "TEST01"
    for folder in (test01, test04):
        assert {"audit.config", "verify_performance.txt", "result.json", "logs"} <= {p.name for p in folder.iterdir()}
        assert (folder / "logs" / "mlperf_log_detail.txt").is_file()
    verify = (test01 / "verify_accuracy.txt").read_text()
    assert verify.splitlines()[-1] == "TEST PASS" and "matched = 50" in verify
    assert results[0].details["counts"]["different"] == 0
    text = (test04 / "logs" / "mlperf_log_summary.txt").read_text()
    assert "samples_per_query : 500" in text and "performance_issue_same : 1" in text
    assert "accuracy_log_sampling_target : 128" in (test01 / "logs" / "mlperf_log_summary.txt").read_text()
    again = CO.run_test("TEST01", FakeGenerator(), run, run.run_dir / "accuracy" / "mlperf_log_accuracy.json")
    assert Path(again.directory).name == "TEST01-2"  # the first audit is kept
    latest = CO.latest_results(run.run_dir)
    assert set(latest) == {"TEST01", "TEST04"} and Path(latest["TEST01"].directory).name == "TEST01-2"

    inputs, sub = build(out)
    assert set(inputs.compliance) == {"TEST01", "TEST04"}
    where = sub.root / "compliance" / sub.system_id / "stable-diffusion-xl" / "Offline"
    assert {p.name for p in (where / "TEST01").iterdir()} == {"verify_accuracy.txt", "verify_performance.txt",
                                                              "performance", "accuracy"}
    assert {p.name for p in (where / "TEST01" / "accuracy").iterdir()} == {"mlperf_log_accuracy.json", "accuracy.txt"}
    assert (where / "TEST01" / "accuracy" / "accuracy.txt").read_text().startswith("hash=")
    assert {p.name for p in (where / "TEST04").iterdir()} == {"verify_performance.txt", "performance"}
    report = S.check_tree(sub.tree, "v4.1")
    assert report.ok, errors_of(report)
    assert not any("compliance" in f.where for f in report.warnings if "short runs" in f.problem)
    assert len(CO.results_table(results)) == 2


def test_v6_puts_the_tests_in_the_scenario_folder(tmp_path, lenient):
    out = tmp_path / "output"
    run = prepared(out, mlperf_round="v6.0")
    CO.run_compliance(FakeGenerator(), run, run.run_dir / "accuracy" / "mlperf_log_accuracy.json")
    _, sub = build(out, mlperf_round="v6.0")
    assert (sub.scenario_dir / "TEST01" / "verify_accuracy.txt").is_file()
    assert (sub.scenario_dir / "TEST04" / "performance" / "run_1" / "mlperf_log_detail.txt").is_file()
    assert not (sub.root / "compliance").exists()
    assert S.check_tree(sub.tree, "v6.0").ok


def constant_scorer(*values):
    """A scorer returning the given (clip, fid) pairs in turn, remembering what it was asked."""
    calls = []

    def scorer(images):
        calls.append([idx for idx, _ in images])
        return values[min(len(calls), len(values)) - 1]

    scorer.calls = calls
    return scorer


def test_different_responses_fail_test01_and_the_metric_fallback_decides(tmp_path, lenient):
    out = tmp_path / "output"
    run = prepared(out)
    log = run.run_dir / "accuracy" / "mlperf_log_accuracy.json"
    plain = CO.run_test("TEST01", FakeGenerator(salt=1), run, log)
    assert plain.accuracy_pass is False and plain.fallback_pass is None and not plain.passed
    assert plain.details["counts"]["different"] == 50 and "not run" in plain.details["fallback"]
    assert (Path(plain.directory) / "verify_accuracy.txt").read_text().splitlines()[-1] == "TEST FAIL"

    close = constant_scorer((31.70, 23.50), (31.75, 23.80))  # CLIP 0.16 %, FID 1.26 %: inside 1 % / 2 %
    rescued = CO.run_test("TEST01", FakeGenerator(salt=1), run, log, scorer=close)
    assert rescued.fallback_pass and rescued.passed
    assert sorted(close.calls[0]) == sorted(close.calls[1]) and len(close.calls[0]) == 50  # same samples both sides
    folder = Path(rescued.directory)
    assert (folder / "baseline_accuracy.txt").read_text().startswith("Accuracy Results: {'FID_SCORE': 23.5,")
    inputs, sub = build(out)
    acc = sub.root / "compliance" / sub.system_id / "stable-diffusion-xl" / "Offline" / "TEST01" / "accuracy"
    assert {"baseline_accuracy.txt", "compliance_accuracy.txt"} <= {p.name for p in acc.iterdir()}
    report = S.check_tree(sub.tree, "v4.1")
    assert report.ok, errors_of(report)

    far = constant_scorer((31.70, 23.50), (31.00, 25.00))
    failed = CO.run_test("TEST01", FakeGenerator(salt=1), run, log, scorer=far)
    assert failed.fallback_pass is False and not failed.passed
    _, sub = build(out)
    assert "TEST01 fallback: CLIP_SCORE differs by 2.26 %" in errors_of(S.check_tree(sub.tree, "v4.1"))
    assert any("TEST01 did not pass" in f.problem for f in sub.build.warnings)


def test_audits_need_a_performance_run_and_test01_an_accuracy_log(tmp_path):
    out = tmp_path / "output"
    acc_only = make_run(out, modes=("accuracy",))
    with pytest.raises(DataError, match="no performance result to audit"):
        CO.run_test("TEST04", FakeGenerator(), acc_only)
    perf_only = make_run(out, modes=("performance",))
    with pytest.raises(DataError, match="TEST01 compares with the accuracy run's log"):
        CO.run_test("TEST01", FakeGenerator(), perf_only, None)
    assert not (perf_only.run_dir / "compliance").exists()


def test_metric_scorer_scores_against_the_runs_own_captions(tmp_path, monkeypatch):
    from sccsdxl import accuracy as A
    from sccsdxl.data import read_sample_set

    run = make_run(tmp_path / "output", modes=("accuracy",))
    asked = {}

    class Clip:
        def scores(self, images, captions):
            asked.setdefault("captions", []).extend(captions)
            return [30.0 + len(captions[0]) % 3 for _ in captions]

    class Models:
        clip, inception, device, mu_ref, sigma_ref = Clip(), None, "cpu", np.zeros(2), np.eye(2)

    monkeypatch.setattr(A, "metric_files_for", lambda *a: asked.setdefault("files", a))
    monkeypatch.setattr(A, "load_metric_models", lambda files, device: Models())
    monkeypatch.setattr(A, "inception_features", lambda model, pils, device: np.ones((len(pils), 2)))
    monkeypatch.setattr(A, "frechet_distance", lambda *a: 7.0)
    scorer = CO.metric_scorer(run.run_dir, "standin", "data", tmp_path, device="cpu")
    images = [(i, np.zeros((16, 16, 3), np.uint8)) for i in (3, 7)]
    clip, fid = scorer(images)
    samples = read_sample_set(run.run_dir)
    assert asked["captions"] == [samples.caption(3), samples.caption(7)] and fid == 7.0
    assert asked["files"][0] == "standin"
    assert json.loads((run.run_dir / "run.json").read_text())["samples"] == 50


def test_multi_gpu_runs_are_described_but_not_audited_with_one_model_copy(tmp_path):
    out = tmp_path / "output"
    run = prepared(out)
    record = json.loads((run.run_dir / "run.json").read_text())
    record["distributed"] = {"nodes": ["node1", "node2"], "ranks": [{"host": "node1"}, {"host": "node2"}]}
    (run.run_dir / "run.json").write_text(json.dumps(record))
    from sccsdxl.errors import KitError
    from sccsdxl.harness import load_run

    with pytest.raises(KitError, match="ran on 2 GPUs through sccsdxl.distributed"):
        CO.generator_for_run(load_run(run.run_dir))
    _, sub = build(out)
    assert sub.system["number_of_nodes"] == 2 and sub.system["host_networking_topology"] == S.NOT_SPECIFIED
