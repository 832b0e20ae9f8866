"""Every notebook: committed without outputs, one tagged parameters cell, and parameters the kit registers."""
from pathlib import Path

import nbformat
import papermill as pm
import pytest
import yaml

from sccsdxl.params import NOTEBOOK_PARAMETERS, PARAMETER_TYPES

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
PARAMS = Path(__file__).resolve().parents[1] / "params"
ALL = sorted(NOTEBOOKS.glob("*.ipynb"))


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.stem)
def test_committed_without_outputs_and_with_one_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not any(c.get("outputs") or c.get("execution_count") for c in code)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.stem)
def test_parameters_cell_matches_the_registry(path):
    inferred = pm.inspect_notebook(str(path))
    assert path.stem in NOTEBOOK_PARAMETERS, f"register {path.stem} in sccsdxl.params.NOTEBOOK_PARAMETERS"
    assert sorted(inferred) == sorted(NOTEBOOK_PARAMETERS[path.stem])
    for name, info in inferred.items():
        assert info["help"], f"{path.stem}: parameter {name} needs a comment"
        kind = PARAMETER_TYPES[name]
        names = [k.__name__ for k in kind] if isinstance(kind, tuple) else [kind.__name__]
        assert info["inferred_type_name"] in names, (path.stem, name)


@pytest.mark.parametrize("path", sorted(PARAMS.glob("*.yaml")), ids=lambda p: p.stem)
def test_parameter_files_use_only_known_names(path):
    assert set(yaml.safe_load(path.read_text())) <= set(PARAMETER_TYPES)
