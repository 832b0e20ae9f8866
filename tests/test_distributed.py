"""Several processes on the CPU (gloo): one process's images, a VALID run, and a clear stop when a rank dies."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from sccsdxl import distributed as D
from sccsdxl.accuracy import iter_accuracy_log
from sccsdxl.errors import DeviceError, ParameterError

REPO = Path(__file__).resolve().parents[1]
COMMON = ["--variant", "base", "--model-source", "tiny", "--dtype", "fp32", "--device", "cpu", "--warmup-batches", "0",
          "--no-progress"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
            "sccsdxl.distributed"]


def env() -> dict:
    """One thread per process (as torchrun sets it), so that one and two processes compute identically."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def start(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(), cwd=REPO)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    output, _ = proc.communicate(timeout=600)
    return proc.returncode, output


def run_dir(output_dir: Path, label: str) -> Path:
    (found,) = (output_dir / "runs").glob(f"*-{label}")
    return found


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory):
    """The same accuracy run in one process and (with a performance run) in two, started side by side."""
    out = tmp_path_factory.mktemp("dist") / "output"
    common = COMMON + ["--batch-size", "8", "--output-dir", str(out)]
    one = start([sys.executable, "-m", "sccsdxl.distributed", *common, "--modes", "accuracy", "--label", "one"])
    two = start([*TORCHRUN, *common, "--modes", "performance,accuracy", "--label", "two",
                 "--result-file", str(out / "two.json")])
    (code_one, log_one), (code_two, log_two) = finish(one), finish(two)
    assert code_one == 0, log_one[-3000:]
    assert code_two == 0, log_two[-3000:]
    return run_dir(out, "one"), run_dir(out, "two"), json.loads((out / "two.json").read_text())


def test_two_processes_make_the_same_images_as_one(one_and_two):
    one, two, _ = one_and_two
    single = dict(iter_accuracy_log(one / "accuracy" / "mlperf_log_accuracy.json"))
    double = dict(iter_accuracy_log(two / "accuracy" / "mlperf_log_accuracy.json"))
    assert sorted(single) == sorted(double) == list(range(50))
    for idx, image in single.items():
        np.testing.assert_array_equal(double[idx], image, err_msg=f"qsl_idx {idx}")


def test_two_process_run_is_valid_and_records_every_rank(one_and_two):
    _, two, result = one_and_two
    summary = (two / "performance" / "mlperf_log_summary.txt").read_text()
    assert "Result is : VALID" in summary and "samples_per_query : 50" in summary
    record = json.loads((two / "run.json").read_text())
    facts = record["distributed"]
    assert record["status"] == "complete" and facts["world_size"] == 2 and facts["backend"] == "gloo"
    assert [r["rank"] for r in facts["ranks"]] == [0, 1]
    assert all(r["gpu_name"] == "CPU" and r["batches"] > 0 for r in facts["ranks"])  # both replicas served
    assert sum(r["samples"] for r in facts["ranks"]) == 100  # 50 per mode
    assert record["results"]["performance"]["valid"] is True and record["model"]["source"] == "tiny"
    assert result["ok"] and result["run_dir"] == str(two) and result["results"]["performance"]["samples_per_second"] > 0
    cache = two.parents[1] / "cache"  # three processes wrote the tokenizer files at once: whole, no scratch left
    assert sorted(p.name for p in cache.iterdir()) == ["clip-bpe"]
    assert sorted(p.name for p in (cache / "clip-bpe").iterdir()) == ["merges.txt", "vocab.json"]


def test_a_rank_that_dies_stops_the_run_with_a_message(tmp_path):
    out = tmp_path / "output"
    started = time.monotonic()
    code, log = finish(start([*TORCHRUN, *COMMON, "--batch-size", "2", "--output-dir", str(out), "--modes",
                              "performance", "--fail-after-batches", "1", "--result-file", str(out / "r.json")]))
    assert code != 0 and time.monotonic() - started < 300
    assert "rank 1 stopped answering while generating a batch of 2" in log, log[-3000:]
    (made,) = (out / "runs").glob("*")
    assert f"what the run wrote so far is kept in {made}" in log
    record = json.loads((made / "run.json").read_text())
    assert record["status"] == "failed" and "rank 1 stopped answering" in record["error"]
    assert (made / "performance" / "mlperf_log_detail.txt").is_file()  # partial loadgen logs are kept
    result = json.loads((out / "r.json").read_text())
    assert result["ok"] is False and result["oom"] is False and result["run_dir"] == str(made)


def test_rank_and_world_come_from_torchrun_or_an_srun_step():
    assert D.cluster_from_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == D.Cluster(3, 8, 1, "torchrun")
    srun = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1"}
    assert D.cluster_from_env(srun) == D.Cluster(5, 8, 1, "slurm")
    assert D.cluster_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}) == D.Cluster()  # the sbatch shell itself
    assert D.cluster_from_env({}) == D.Cluster()
    with pytest.raises(ParameterError, match="malformed rank"):
        D.cluster_from_env({"RANK": "x", "WORLD_SIZE": "2"})


def test_backend_is_nccl_with_gloo_on_gpus_and_gloo_on_the_cpu():
    assert D.resolve_backend("auto", "cpu") == "gloo"
    assert D.resolve_backend("auto", "cuda") == "cpu:gloo,cuda:nccl"
    assert D.resolve_backend("gloo", "cuda") == "gloo"
    with pytest.raises(ParameterError, match="nccl needs GPUs"):
        D.resolve_backend("nccl", "cpu")


def test_more_processes_than_gpus_stop_with_the_count():
    D.check_local_gpu(1, 2)
    with pytest.raises(DeviceError, match="needs GPU 2, but torch sees only 2 GPU") as err:
        D.check_local_gpu(2, 2, "node7")
    assert "--nproc-per-node 2" in err.value.fix and "node7" in err.value.problem


def test_srun_without_rank_zeros_address_stops_with_the_fix(tmp_path, monkeypatch, capsys):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    code = D.main([*COMMON, "--output-dir", str(tmp_path)])
    assert code == D.EXIT_KIT_ERROR
    assert "MASTER_ADDR and MASTER_PORT not set" in capsys.readouterr().err


def test_parameter_file_sets_defaults_and_flags_win(tmp_path):
    tuned = tmp_path / "tuned.yaml"
    tuned.write_text(yaml.safe_dump({"model_source": "tiny", "dtype": "fp32", "batch_size": 16, "image_grid": 4}))
    args = D.parse_args(["-f", str(tuned), "--dtype", "bf16"])
    assert (args.model_source, args.dtype, args.batch_size) == ("tiny", "bf16", 16)
    tuned.write_text("batch_szie: 4\n")
    with pytest.raises(ParameterError, match="unknown parameter"):
        D.parse_args(["-f", str(tuned)])


def test_modes_flag_takes_a_subset():
    assert D._modes("performance, accuracy") == ("performance", "accuracy")
    with pytest.raises(ParameterError, match="--modes"):
        D._modes("perf")


def test_an_srun_task_bound_to_one_gpu_uses_it():
    assert D.gpu_index(D.Cluster(5, 8, 1, "slurm"), available=1) == 0
    assert D.gpu_index(D.Cluster(5, 8, 1, "slurm"), available=4) == 1
    with pytest.raises(DeviceError):
        D.gpu_index(D.Cluster(1, 2, 1, "torchrun"), available=1)  # torchrun: two processes, one GPU
