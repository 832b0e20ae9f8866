"""02_baseline end to end on the CPU with params/ci.yaml: the same notebook users run on their GPU."""
import json

import numpy as np
import pytest

from sccsdxl.accuracy import iter_accuracy_log
from sccsdxl.data import read_sample_set

pytestmark = pytest.mark.notebook


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, ci_params):
    from conftest import execute_notebook

    work = tmp_path_factory.mktemp("nb02")
    _, output_dir = execute_notebook("02_baseline", work, {**ci_params, "output_dir": str(work / "output")})
    return json.loads((output_dir / "02_baseline.json").read_text())


def test_performance_run_is_valid_with_every_sample(baseline, ci_params):
    assert baseline["valid"] is True and baseline["samples"] == 50
    assert baseline["samples_per_second"] > 0
    assert baseline["config"]["batch_size"] == ci_params["batch_size"]
    summary = (baseline["run_dir"] + "/performance/mlperf_log_summary.txt")
    text = open(summary).read()
    assert "Result is : VALID" in text and "samples_per_query : 50" in text
    assert baseline["valid_for_accuracy"] is False


def test_logged_images_are_the_pipelines_outputs(baseline, tiny_runner):
    run_dir = baseline["run_dir"]
    samples = read_sample_set(run_dir)
    logged = dict(iter_accuracy_log(run_dir + "/accuracy/mlperf_log_accuracy.json", tiny_runner.response_shape))
    assert sorted(logged) == list(range(50))
    check = [0, 1, 2, 17, 49]
    expected = tiny_runner.generate([samples.caption(i) for i in check])
    for idx, image in zip(check, expected):
        assert np.abs(logged[idx].astype(int) - image).max() <= 1, idx


def test_bad_parameter_stops_the_notebook_with_one_message(tmp_path, ci_params):
    import papermill as pm

    from conftest import NOTEBOOKS

    with pytest.raises(pm.PapermillExecutionError) as err:
        pm.execute_notebook(str(NOTEBOOKS / "02_baseline.ipynb"), str(tmp_path / "out.ipynb"),
                            parameters={**ci_params, "output_dir": str(tmp_path), "batch_szie": 4},
                            cwd=str(tmp_path), kernel_name="python3", progress_bar=False)
    assert "did you mean 'batch_size'" in str(err.value)
    assert not (tmp_path / "runs").exists()
