import pytest

from sccsdxl.errors import ParameterError
from sccsdxl.params import NOTEBOOK_PARAMETERS, PARAMETER_TYPES, check_parameters, injected_parameter_names

BASELINE = {"variant": "main", "model_source": "hf", "model_path": "", "dtype": "fp16", "batch_size": 1,
            "device": "auto", "mlperf_round": "v4.1", "output_dir": "output", "target_qps": 0.0,
            "warmup_batches": 1, "image_grid": 6, "show_progress": True, "interactive": False,
            "optimizations": "", "data_dir": ""}


def test_injected_names_are_read_from_papermills_cell():
    history = ["", "variant = 'main'\nbatch_size = 1\n", "# Parameters\nbatch_szie = 8\nvariant = \"base\"\n", "x = 1"]
    assert injected_parameter_names(history) == ["batch_szie", "variant"]


def test_misspelt_parameter_stops_with_a_suggestion():
    with pytest.raises(ParameterError, match="'batch_szie' \\(did you mean 'batch_size'\\?\\)"):
        check_parameters("02_baseline", {**BASELINE, "batch_szie": 8}, injected=["batch_szie"])


def test_parameters_of_other_notebooks_are_ignored_with_a_note(capsys):
    other = next((n for n in PARAMETER_TYPES if n not in NOTEBOOK_PARAMETERS["02_baseline"]), None)
    if other is None:
        pytest.skip("every known parameter belongs to 02_baseline")
    values = check_parameters("02_baseline", BASELINE, injected=[other, "variant"])
    assert values == BASELINE and other in capsys.readouterr().out


def test_wrong_type_names_the_parameter_and_the_fix():
    with pytest.raises(ParameterError, match="'batch_size' must be int, got '8'"):
        check_parameters("02_baseline", {**BASELINE, "batch_size": "8"}, injected=["batch_size"])
    with pytest.raises(ParameterError, match="'batch_size' must be int, got True"):
        check_parameters("02_baseline", {**BASELINE, "batch_size": True}, injected=[])


def test_int_is_accepted_for_a_float_parameter():
    assert check_parameters("02_baseline", {**BASELINE, "target_qps": 2}, injected=[])["target_qps"] == 2


def test_every_declared_parameter_has_a_type():
    for notebook, names in NOTEBOOK_PARAMETERS.items():
        assert set(names) <= set(PARAMETER_TYPES), notebook
