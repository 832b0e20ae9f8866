"""The batch-size sweep with stand-in generators: persistence, resume, out-of-memory points, tuned.yaml, plots."""
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sccsdxl import sweep
from sccsdxl.distributed import RankError, is_oom
from sccsdxl.errors import DeviceError, KitError, ParameterError
from sccsdxl.harness import RunConfig
from sccsdxl.params import NOTEBOOK_PARAMETERS
from sccsdxl.sweep import SweepPoint


class FakeGenerator:
    """Tiny images at once; counts the prompts it served; fails as told from a batch size on."""

    response_shape = (4, 4, 3)

    def __init__(self, fail_from: int | None = None, error: type = torch.OutOfMemoryError):
        self.fail_from, self.error = fail_from, error
        self.prompts = 0
        self.lock = threading.Lock()

    def generate(self, prompts):
        with self.lock:
            self.prompts += len(prompts)
        if self.fail_from is not None and len(prompts) >= self.fail_from:
            raise self.error(f"CUDA out of memory. Tried to allocate {len(prompts)} GiB (simulated)")
        return np.zeros((len(prompts), 4, 4, 3), dtype=np.uint8)


def config(tmp_path, **kw) -> RunConfig:
    return RunConfig(**{"variant": "base", "model_source": "tiny", "dtype": "fp32", "device": "cpu",
                        "output_dir": str(tmp_path / "out"), "warmup_batches": 0, **kw})


def lines(cfg) -> list[dict]:
    return [json.loads(line) for line in (sweep.sweep_dir(cfg) / sweep.POINTS_FILE).read_text().splitlines()]


def test_every_point_is_measured_saved_and_reused_on_a_rerun(tmp_path):
    cfg, fake = config(tmp_path), FakeGenerator()
    points = sweep.run_sweep(cfg, [8, 2, 4, 4], generator=fake, echo=lambda _: None)
    assert [p.batch_size for p in points] == [2, 4, 8]
    assert all(p.status == "ok" and p.valid and p.samples_per_second > 0 and p.gpus == 1 for p in points)
    assert all(p.peak_memory_bytes is None for p in points)  # CPU
    assert [p.samples for p in points] == [50, 50, 50]  # base: 50 samples each, so batch 4 and 8 end partial
    for p in points:
        record = json.loads((Path(p.run_dir) / "run.json").read_text())
        assert record["config"]["batch_size"] == p.batch_size and "performance" in record["results"]
        assert p.run_dir.endswith(f"sweep-bs{p.batch_size}-x1")
    assert [line["batch_size"] for line in lines(cfg)] == [2, 4, 8]
    served = fake.prompts
    again = sweep.run_sweep(cfg, [2, 4, 8], generator=fake, echo=lambda _: None)
    assert fake.prompts == served and again == points  # nothing ran twice
    more = sweep.run_sweep(cfg, [4, 16], generator=fake, echo=lambda _: None)
    assert [p.batch_size for p in more] == [4, 16] and more[0] == points[1] and fake.prompts == served + 50


def test_other_settings_start_another_sweep(tmp_path):
    fake = FakeGenerator()
    sweep.run_sweep(config(tmp_path), [4], generator=fake, echo=lambda _: None)
    other = config(tmp_path, mlperf_round="v5.0")
    assert sweep.sweep_dir(other) != sweep.sweep_dir(config(tmp_path))
    served = fake.prompts
    sweep.run_sweep(other, [4], generator=fake, echo=lambda _: None)
    assert fake.prompts == served + 50


@pytest.mark.parametrize("warmup_batches", [0, 1])  # OOM inside loadgen (wrapped in KitError) or in the warm-up (bare)
def test_out_of_memory_points_are_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch, warmup_batches):
    freed = []
    monkeypatch.setattr(sweep, "free_memory", lambda: freed.append(1))
    cfg, fake = config(tmp_path, warmup_batches=warmup_batches), FakeGenerator(fail_from=8)
    points = sweep.run_sweep(cfg, [2, 8, 4, 16], generator=fake, echo=lambda _: None)
    assert [(p.batch_size, p.status) for p in points] == [(2, "ok"), (4, "ok"), (8, "oom"), (16, "oom")]
    assert "out of memory" in points[2].error and points[2].samples_per_second is None
    assert len(freed) == 2
    assert sweep.best_point(points).batch_size in (2, 4)
    served = fake.prompts
    assert sweep.run_sweep(cfg, [2, 4, 8, 16], generator=fake, echo=lambda _: None) == points
    assert fake.prompts == served  # OOM points are results: not tried again


def test_a_failed_point_is_kept_apart_and_tried_again(tmp_path):
    cfg, fake = config(tmp_path), FakeGenerator(fail_from=8, error=ValueError)
    points = sweep.run_sweep(cfg, [4, 8], generator=fake, echo=lambda _: None)
    assert [p.status for p in points] == ["ok", "error"] and "ValueError" in points[1].error
    assert points[1].run_dir and Path(points[1].run_dir, "run.json").is_file()  # what was written is kept
    fake.fail_from = None
    again = sweep.run_sweep(cfg, [4, 8], generator=fake, echo=lambda _: None)
    assert [p.status for p in again] == ["ok", "ok"] and again[0] == points[0]


def test_a_torn_last_line_is_skipped(tmp_path):
    cfg = config(tmp_path)
    sweep.run_sweep(cfg, [4], generator=FakeGenerator(), echo=lambda _: None)
    with open(sweep.sweep_dir(cfg) / sweep.POINTS_FILE, "a") as fh:
        fh.write('{"batch_size": 8, "gpus": 1, "sta')
    assert list(sweep.load_points(sweep.sweep_dir(cfg), sweep.sweep_settings(cfg))) == [(4, 1)]


def test_out_of_memory_is_found_through_wrapping():
    wrapped = KitError("the model failed during the performance run")
    wrapped.__cause__ = torch.OutOfMemoryError("CUDA out of memory")
    assert is_oom(wrapped) and is_oom(torch.OutOfMemoryError("x"))
    assert is_oom(RuntimeError("HIP out of memory. Tried to allocate 20.00 GiB"))
    assert is_oom(RankError("rank 1 failed", oom=True))
    assert not is_oom(KitError("something else")) and not is_oom(ValueError("out of memory"))


@pytest.mark.parametrize("bad", [[], [0], [4, -2], [2.5], ["4"], [True], "4", None])
def test_batch_sizes_must_be_positive_integers(bad):
    with pytest.raises(ParameterError, match='-y "batch_sizes: '):
        sweep.check_batch_sizes(bad)


def test_batch_sizes_are_sorted_without_repeats():
    assert sweep.check_batch_sizes([8, 1, 8, 2]) == [1, 2, 8]


def test_more_gpus_than_the_machine_has_stop_with_the_count():
    with pytest.raises(DeviceError, match=r"gpus \[2, 4\] asked for, but this machine has 1 GPU") as err:
        sweep.check_gpu_counts([1, 2, 4], "cuda", available=1)
    assert 'gpus: [1, 1]' in err.value.fix
    with pytest.raises(DeviceError, match="CPU cores"):
        sweep.check_gpu_counts([1, 3], "cpu", available=2)
    with pytest.raises(ParameterError, match='-y "gpus: '):
        sweep.check_gpu_counts([0], "cuda", available=4)
    assert sweep.check_gpu_counts([4, 1], "cuda", available=4) == [1, 4]


def test_bad_input_stops_before_any_run(tmp_path):
    with pytest.raises(ParameterError):
        sweep.run_sweep(config(tmp_path), [0, 4], generator=FakeGenerator(), echo=lambda _: None)
    assert not (tmp_path / "out" / "sweep").exists()


def test_tuned_yaml_holds_the_best_point_and_never_overwrites_an_earlier_one(tmp_path):
    cfg = config(tmp_path, optimizations="")
    first, archived = sweep.write_tuned(cfg, SweepPoint(8, 1, "ok", 1.5, True, 3 * 2**30, "r1"))
    assert archived is None
    values = yaml.safe_load(first.read_text())
    assert values == {"model_source": "tiny", "dtype": "fp32", "device": "cpu", "batch_size": 8}
    assert set(values) <= set(NOTEBOOK_PARAMETERS["02_baseline"])  # -f works for 02 (and the others)
    text = first.read_text()
    second, archived = sweep.write_tuned(cfg, SweepPoint(16, 2, "ok", 3.0, True, None, "r2"))
    assert second == first and archived.is_file() and archived.read_text() == text
    assert archived.name.startswith("tuned-") and yaml.safe_load(second.read_text())["batch_size"] == 16
    assert "torchrun --nproc-per-node 2" in second.read_text()
    same, archived = sweep.write_tuned(cfg, SweepPoint(16, 2, "ok", 3.0, True, None, "r2"))  # a resumed sweep
    assert archived is None and len(list(first.parent.glob("tuned*.yaml"))) == 2


def test_best_point_is_the_fastest_valid_one():
    points = [SweepPoint(4, 1, "ok", 1.0, True), SweepPoint(8, 1, "ok", 2.0, False), SweepPoint(16, 1, "oom"),
              SweepPoint(2, 1, "ok", 1.0, True)]
    assert sweep.best_point(points).batch_size == 2  # tie: the smaller batch
    with pytest.raises(KitError, match="no batch size gave a valid performance run"):
        sweep.require_best([SweepPoint(16, 1, "oom")])


def fake_torchrun(result: dict | None, code: int = 0, output: str = ""):
    calls = []

    def run(command, echo):
        calls.append(command)
        if result is not None:
            path = Path(command[command.index("--result-file") + 1])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result))
        return code, output

    return run, calls


def test_a_multi_gpu_point_is_one_torchrun_and_its_result_file(tmp_path):
    cfg = config(tmp_path)
    ok = {"ok": True, "run_dir": "runs/x", "peak_memory_bytes": 7,
          "results": {"performance": {"samples_per_second": 3.5, "valid": True,
                                      "gpu_power": {"energy_j": 6160.0, "joules_per_sample": 308.0}}}}
    run, calls = fake_torchrun(ok)
    point = sweep.run_distributed_point(cfg, 8, 2, runner=run)
    assert (point.status, point.samples_per_second, point.valid, point.peak_memory_bytes) == ("ok", 3.5, True, 7)
    assert point.joules_per_sample == 308.0 and list(sweep.points_table([point])["J/sample"]) == [308.0]
    command = calls[0]
    assert command[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    assert command[command.index("-m", 2) + 1] == "sccsdxl.distributed"
    assert command[command.index("--batch-size") + 1] == "8" and command[command.index("--modes") + 1] == "performance"
    run, _ = fake_torchrun({"ok": False, "error": "rank 1 failed: OutOfMemoryError: ...", "oom": True}, code=1)
    assert sweep.run_distributed_point(cfg, 8, 2, runner=run).status == "oom"
    run, _ = fake_torchrun(None, code=1, output="line one\nChildFailedError: rank 1 exitcode -9")
    failed = sweep.run_distributed_point(cfg, 8, 2, runner=run)
    assert failed.status == "error" and "torchrun exited with 1" in failed.error and "exitcode -9" in failed.error


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two CPU processes need two cores")
def test_other_gpu_counts_run_at_the_best_batch_size(tmp_path):
    cfg = config(tmp_path)
    result = {"ok": True, "run_dir": "r", "peak_memory_bytes": None,
              "results": {"performance": {"samples_per_second": 1e9, "valid": True}}}
    run, calls = fake_torchrun(result)
    points = sweep.run_sweep(cfg, [2, 4], [1, 2], generator=FakeGenerator(), echo=lambda _: None,
                             distributed_runner=run)
    best_single = sweep.best_point(points, gpus=1)
    assert [p.key for p in points][-1] == (best_single.batch_size, 2) and len(calls) == 1
    assert sweep.best_point(points).gpus == 2
    sweep.run_sweep(cfg, [2, 4], [1, 2], generator=FakeGenerator(), echo=lambda _: None, distributed_runner=run)
    assert len(calls) == 1  # resumed


def test_plot_table_and_markdown_show_every_point():
    import matplotlib

    matplotlib.use("Agg")
    gib = 2**30
    points = [SweepPoint(1, 1, "ok", 0.5, True, 10 * gib), SweepPoint(8, 1, "ok", 1.2, True, 24 * gib),
              SweepPoint(32, 1, "oom", error="x"), SweepPoint(8, 2, "ok", 2.3, True, 24 * gib)]
    best = sweep.best_point(points)
    figure = sweep.plot_sweep(points)
    assert len(figure.axes) == 3  # throughput (+ memory twin) and scaling
    table = sweep.points_table(points, best)
    assert list(table["best"]) == ["", "", "", "*"]
    assert table["scaling"].iloc[3] == pytest.approx(2.3 / 2.4)
    markdown = sweep.markdown_table(points, best)
    assert markdown.count("\n") == 6 and "| oom |" in markdown
    assert sweep.last_batch(50, 8) == "2 of 8" and sweep.last_batch(50, 10) == "full"
    assert list(sweep.points_table([SweepPoint(25, 1, "ok", 1.6, True, samples=50)])["last batch"]) == ["full"]
    assert set(table["last batch"]) == {"-"}  # points recorded without their sample count
    assert len(sweep.plot_sweep(points[:3]).axes) == 2
    assert len(sweep.plot_sweep([SweepPoint(4, 1, "ok", 1.0, True)]).axes) == 1  # CPU: no memory axis


def test_controls_start_from_the_parameters():
    panel = sweep.sweep_controls([4, 8], [1], max_gpus=2)
    assert panel.chosen() == ([4, 8], [1])
