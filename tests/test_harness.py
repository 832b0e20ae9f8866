import json
import threading

import numpy as np
import pytest

from sccsdxl import harness, power
from sccsdxl.accuracy import iter_accuracy_log
from sccsdxl.data import sample_set
from sccsdxl.errors import KitError, OutputError, ParameterError
from sccsdxl.harness import RunConfig, run_benchmark
from sccsdxl.rounds import ROUNDS


def fingerprint(prompt: str) -> np.ndarray:
    """A 4x4 RGB image that identifies the prompt."""
    rng = np.random.default_rng(abs(hash(prompt)) % (2**32))
    return rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)


class FakeGenerator:
    """Stands in for the pipeline: deterministic tiny images, records batch sizes."""

    response_shape = (4, 4, 3)

    def __init__(self, fail_after: int | None = None):
        self.batches: list[int] = []
        self.fail_after = fail_after
        self.lock = threading.Lock()

    def generate(self, prompts):
        with self.lock:
            self.batches.append(len(prompts))
            if self.fail_after is not None and len(self.batches) > self.fail_after:
                raise RuntimeError("CUDA out of memory (simulated)")
        return np.stack([fingerprint(p) for p in prompts])


def config(tmp_path, **kw) -> RunConfig:
    return RunConfig(**{"variant": "base", "model_source": "tiny", "dtype": "fp32", "device": "cpu",
                        "batch_size": 8, "output_dir": str(tmp_path), "warmup_batches": 0, **kw})


def test_offline_run_is_valid_and_logs_every_sample_once(tmp_path):
    fake = FakeGenerator()
    run = run_benchmark(config(tmp_path), generator=fake, show_progress=False)
    perf, acc = run.result("performance"), run.result("accuracy")
    assert perf["valid"] is True and perf["samples"] == 50 and perf["samples_per_second"] > 0
    assert acc["samples"] == 50
    if not harness._cuda_ready():  # no GPU in use: no power record, and the run is not held up for want of one
        assert perf["gpu_power"] is None and acc["gpu_power"] is None
    assert fake.batches.count(8) >= 12 and max(fake.batches) == 8  # 50 = 6 x 8 + 2 per mode
    samples = sample_set("base")
    logged = dict(iter_accuracy_log(run.run_dir / "accuracy" / "mlperf_log_accuracy.json", (4, 4, 3)))
    assert sorted(logged) == list(range(50))
    for idx, image in logged.items():  # each response is the image of that sample's caption
        np.testing.assert_array_equal(image, fingerprint(samples.caption(idx)))


@pytest.mark.skipif(power.load_nvml() is None, reason="needs an NVIDIA GPU and NVML (run on the H200)")
def test_a_gpu_run_records_the_energy_of_each_gpu_it_sees_and_per_sample(tmp_path):
    import torch

    run = run_benchmark(config(tmp_path, device="cuda"), modes=("performance",), show_progress=False)
    perf = run.result("performance")
    record = perf["gpu_power"]
    assert len(record["gpus"]) == torch.cuda.device_count()
    assert record["energy_j"] > 0 and record["joules_per_sample"] == pytest.approx(record["energy_j"] / 50, abs=0.01)
    assert json.loads((run.run_dir / harness.RUN_FILE).read_text())["results"]["performance"]["gpu_power"] == record


def test_run_directory_holds_logs_conf_samples_and_record(tmp_path):
    run = run_benchmark(config(tmp_path), modes=("performance",), generator=FakeGenerator(), show_progress=False)
    names = {p.name for p in run.run_dir.iterdir()}
    assert {"run.json", "user.conf", "samples.tsv", "performance"} <= names
    summary = (run.run_dir / "performance" / "mlperf_log_summary.txt").read_text()
    assert "Result is : VALID" in summary and "samples_per_query : 50" in summary
    record = json.loads((run.run_dir / "run.json").read_text())
    assert record["config"]["batch_size"] == 8 and record["round"] == "v4.1"
    assert {"torch", "diffusers", "mlcommons-loadgen"} <= set(record["versions"])
    assert record["valid_for_accuracy"] is False  # tiny: never score it


@pytest.mark.parametrize("round_name", ["v4.1", "v6.0"])
def test_the_rounds_seeds_reach_the_loadgen_log(tmp_path, round_name):
    run = run_benchmark(config(tmp_path, mlperf_round=round_name), modes=("performance",),
                        generator=FakeGenerator(), show_progress=False)
    assert run.result("performance")["seeds"] == ROUNDS[round_name].seeds
    assert run.result("performance")["errors"] == []


def test_two_runs_in_one_process_leave_no_loadgen_errors(tmp_path):
    run = run_benchmark(config(tmp_path), generator=FakeGenerator(), show_progress=False)
    assert run.result("performance")["errors"] == [] and run.result("accuracy")["errors"] == []


def test_runs_never_share_a_directory(tmp_path):
    first = run_benchmark(config(tmp_path), modes=("performance",), generator=FakeGenerator(), show_progress=False)
    second = run_benchmark(config(tmp_path), modes=("performance",), generator=FakeGenerator(), show_progress=False)
    assert first.run_dir != second.run_dir and first.run_dir.exists()
    assert json.loads((first.run_dir / "run.json").read_text())["run_dir"] == str(first.run_dir)


def test_several_generators_share_the_query(tmp_path):
    fakes = [FakeGenerator(), FakeGenerator()]
    run = run_benchmark(config(tmp_path, batch_size=4), modes=("accuracy",), generator=fakes, show_progress=False)
    assert run.result("accuracy")["samples"] == 50
    assert sum(sum(f.batches) for f in fakes) == 50


def test_a_model_failure_stops_the_run_with_a_clear_message(tmp_path):
    with pytest.raises(KitError, match="the model failed during the performance run .*CUDA out of memory") as err:
        run_benchmark(config(tmp_path), modes=("performance",), generator=FakeGenerator(fail_after=2),
                      show_progress=False)
    assert "batch_size" in err.value.fix
    assert (next((tmp_path / "runs").iterdir()) / "performance" / "mlperf_log_detail.txt").exists()  # logs kept


@pytest.mark.parametrize("field,value,message", [
    ("batch_size", 0, "batch_size must be an integer >= 1"),
    ("variant", "huge", "unknown variant 'huge'"),
    ("dtype", "fp8", "unknown dtype 'fp8'"),
    ("model_source", "civitai", "unknown model_source 'civitai'"),
    ("mlperf_round", "v3.0", "unknown MLPerf round"),
    ("target_qps", -1, "target_qps must be a number >= 0"),
])
def test_bad_parameters_stop_before_any_work(tmp_path, field, value, message):
    with pytest.raises(ParameterError, match=message):
        run_benchmark(config(tmp_path, **{field: value}), generator=FakeGenerator())
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_no_gpu_for_a_model_that_needs_one(tmp_path, monkeypatch):
    import torch

    from sccsdxl.errors import DeviceError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="no GPU is visible") as err:
        config(tmp_path, model_source="synthetic", device="auto").validate()
    assert "model_source tiny" in err.value.fix


def test_mlcommons_source_needs_a_checkpoint_directory(tmp_path):
    from sccsdxl.errors import ModelError

    with pytest.raises(ParameterError, match="needs model_path"):
        config(tmp_path, model_source="mlcommons").validate()
    with pytest.raises(ModelError, match="missing checkpoint_pipe/model_index.json"):
        config(tmp_path, model_source="mlcommons", model_path=str(tmp_path)).validate()


def test_unwritable_output_dir_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OutputError, match="cannot be written"):
        config(blocker).validate()


def test_user_conf_short_run_and_full_run():
    short = harness.user_conf_text(500, "main", 0)
    assert "stable-diffusion-xl.Offline.min_query_count = 500" in short
    assert "stable-diffusion-xl.Offline.min_duration = 0" in short
    full = harness.user_conf_text(5000, "full", 1.6)
    assert "target_qps = 1.6" in full and "min_duration" not in full.split("#", 1)[0]


def test_conf_reader_follows_loadgens_wildcard_precedence(tmp_path):
    conf = tmp_path / "audit.config"
    conf.write_text("*.*.mode = 2\n*.Offline.min_query_count = 10\nstable-diffusion-xl.Offline.min_query_count = 500\n"
                    "resnet50.Offline.min_query_count = 7\n*.Server.target_qps = 3  # other scenario\n")
    assert harness.read_conf(conf) == {"mode": "2", "min_query_count": "500"}


def test_full_variant_keeps_the_closed_division_minimums(tmp_path):
    conf = tmp_path / "user.conf"
    conf.write_text(harness.user_conf_text(5000, "full", 2.0))
    settings = harness.loadgen_settings("performance", conf, ROUNDS["v4.1"])
    assert settings.min_query_count == 5000 and settings.min_duration_ms == 600000
    assert settings.offline_expected_qps == 2.0


def test_audit_config_is_applied_after_user_conf(tmp_path):
    import mlperf_loadgen as lg

    conf = tmp_path / "user.conf"
    conf.write_text(harness.user_conf_text(50, "base", 0))
    audit = tmp_path / "audit.config"
    audit.write_text("*.*.mode = 2\n*.*.performance_issue_same = 1\n*.*.performance_issue_same_index = 3\n"
                     "*.*.performance_issue_unique = 0\n")
    settings = harness.loadgen_settings("accuracy", conf, ROUNDS["v4.1"], audit)
    assert settings.mode == lg.TestMode.PerformanceOnly and settings.performance_issue_same
    assert settings.performance_issue_same_index == 3


def test_malformed_conf_line_is_reported(tmp_path):
    conf = tmp_path / "user.conf"
    conf.write_text("stable-diffusion-xl.Offline.target_qps 3\n")
    with pytest.raises(ParameterError, match="user.conf:1: expected"):
        harness.read_conf(conf)


def test_results_table_and_widget_panel(tmp_path):
    run = run_benchmark(config(tmp_path), modes=("performance",), generator=FakeGenerator(), show_progress=False)
    table = harness.results_table(run)
    assert table.loc["performance", "result"] == "VALID" and table.loc["performance", "samples"] == 50

    from sccsdxl.widgets import rerun_panel

    seen = []
    panel = rerun_panel(config(tmp_path), run=lambda c: seen.append(c) or run)
    panel.on_click()
    assert seen and seen[0].batch_size == 8


def test_cli_runs_and_reports_bad_input(tmp_path, capsys):
    from sccsdxl.cli import main

    assert main(["run", "--variant", "nope", "--output-dir", str(tmp_path)]) == 2
    assert "unknown variant 'nope'" in capsys.readouterr().err


class CompiledFake(FakeGenerator):
    """A generator that says it holds compiled regions and pads like SDXLRunner."""

    info = {"compiled_regions": 3}

    def __init__(self):
        super().__init__()
        self.pad_to, self.exact_sizes = 0, set()


@pytest.mark.parametrize("info", [{"compiled_regions": 3}, {"compiled_vae_regions": 7}])
def test_warm_up_builds_the_partial_batch_shape_before_the_timed_run(tmp_path, info):
    fake = CompiledFake()
    fake.info = info  # a compiled UNet or only a compiled VAE decoder: either keeps one graph per batch shape
    run_benchmark(config(tmp_path, warmup_batches=1), modes=("performance",), generator=fake, show_progress=False)
    assert fake.batches[:2] == [8, 2]  # warm-up: one full batch, then the run's 50 % 8 = 2
    assert fake.pad_to == 8 and fake.exact_sizes == {2}


def test_batch_shapes_are_planned_only_for_compiled_models():
    eager, compiled = FakeGenerator(), CompiledFake()
    harness.plan_batch_shapes(eager, 8, 50)
    harness.plan_batch_shapes(compiled, 10, 50)
    assert not hasattr(eager, "pad_to")
    assert compiled.pad_to == 10 and compiled.exact_sizes == set()  # 50 = 5 x 10: no partial batch
    assert harness.warm_up(compiled, 10, 0, partial=3) >= 0 and compiled.batches == []  # no warm-up asked
