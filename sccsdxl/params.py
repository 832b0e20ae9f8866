"""Notebook parameters: one registry of names and types, checked before any work starts.

papermill only warns about a parameter the notebook does not declare, so a misspelt name would silently
run the defaults. ``check_parameters`` reads the names papermill injected (from IPython's input history)
and stops on any name that no kit notebook knows; a name that belongs to another notebook is ignored
with a note, so one YAML file per machine can serve every notebook.
"""
from __future__ import annotations

import ast
import difflib
from typing import Any

from .errors import ParameterError

# Every parameter name the kit's notebooks use, with its type. Same name, same meaning everywhere.
PARAMETER_TYPES: dict[str, type | tuple[type, ...]] = {
    "variant": str, "model_source": str, "model_path": str, "dtype": str, "batch_size": int, "device": str,
    "mlperf_round": str, "output_dir": str, "interactive": bool, "data_dir": str, "target_qps": (int, float),
    "warmup_batches": int, "show_progress": bool, "image_grid": int, "optimizations": str,
    "run_dir": str, "metric_models": str, "metrics_device": str, "metrics_batch_size": int,  # 05_accuracy
    "fetch": str, "mirror_url": str,  # 01_setup
    "batch_sizes": list, "gpus": list,  # 03_batch_size_sweep
    "configs": list, "guard_samples": int, "warm_start": bool,  # 04_quantization
    "submitter": str, "division": str, "category": str, "system_name": str, "system_overrides": dict,  # 06_submission
    "run_compliance": bool, "checker_path": str, "push_repo": str, "push_branch": str,  # 06_submission
}

# Which notebook declares which parameters (tests check this against each notebook's parameters cell).
NOTEBOOK_PARAMETERS: dict[str, list[str]] = {
    "01_setup": ["data_dir", "dtype", "model_source", "model_path", "fetch", "mirror_url", "output_dir",
                 "show_progress", "interactive"],
    "02_baseline": ["variant", "model_source", "model_path", "dtype", "batch_size", "device", "mlperf_round",
                    "output_dir", "data_dir", "target_qps", "warmup_batches", "optimizations", "image_grid",
                    "show_progress", "interactive"],
    "03_batch_size_sweep": ["variant", "model_source", "model_path", "dtype", "device", "optimizations", "mlperf_round",
                            "output_dir", "batch_sizes", "gpus", "warmup_batches", "show_progress", "interactive"],
    "04_quantization": ["variant", "model_source", "model_path", "device", "batch_size", "configs", "guard_samples",
                        "metric_models", "metrics_device", "mlperf_round", "output_dir", "data_dir", "warmup_batches",
                        "warm_start", "show_progress", "interactive"],
    "05_accuracy": ["variant", "model_source", "model_path", "dtype", "batch_size", "optimizations", "device", "mlperf_round",
                    "output_dir", "run_dir", "data_dir", "metric_models", "metrics_device", "metrics_batch_size",
                    "image_grid", "show_progress", "interactive"],
    "06_submission": ["submitter", "division", "category", "system_name", "run_dir", "mlperf_round", "output_dir",
                      "system_overrides", "run_compliance", "data_dir", "metric_models", "checker_path", "push_repo",
                      "push_branch", "show_progress", "interactive"],
}

INJECTED_MARKER = "# Parameters"  # first line of the cell papermill inserts after the 'parameters' cell


def injected_parameter_names(history: list[str] | None = None) -> list[str]:
    """Names assigned in papermill's injected-parameters cell of the running kernel (empty when run by hand)."""
    if history is None:
        try:
            from IPython import get_ipython

            shell = get_ipython()
        except ImportError:
            shell = None
        history = list(shell.user_ns.get("In", [])) if shell is not None else []
    names: list[str] = []
    for source in history:
        if not source.lstrip().startswith(INJECTED_MARKER):
            continue
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        names += [t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
                  if isinstance(t, ast.Name)]
    return names


def _type_name(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__


def check_parameters(notebook: str, namespace: dict[str, Any], injected: list[str] | None = None) -> dict[str, Any]:
    """The notebook's declared parameters from ``namespace``, after checking every injected name and every type."""
    if notebook not in NOTEBOOK_PARAMETERS:
        raise ParameterError(f"no parameter list is registered for notebook {notebook!r}",
                             "add it to sccsdxl.params.NOTEBOOK_PARAMETERS")
    declared = NOTEBOOK_PARAMETERS[notebook]
    known = set(PARAMETER_TYPES)
    injected = injected_parameter_names() if injected is None else injected
    unknown = [n for n in injected if n not in known]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, declared, n=1) or difflib.get_close_matches(name, known, n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ParameterError(f"unknown parameter {', '.join(hints)} for {notebook}",
                             f"use only the names this notebook declares: {', '.join(declared)} "
                             f"(papermill --help-notebook notebooks/{notebook}.ipynb lists them)")
    foreign = sorted({n for n in injected if n not in declared})
    if foreign:
        print(f"note: {', '.join(foreign)} belong to other notebooks and are ignored here")
    values = {}
    for name in declared:
        if name not in namespace:
            raise ParameterError(f"parameter {name!r} is not defined in {notebook}",
                                 "restore the notebook's parameters cell (git checkout notebooks/)")
        value, kind = namespace[name], PARAMETER_TYPES[name]
        wrong_bool = isinstance(value, bool) and kind is not bool and kind != (int, float)
        if not isinstance(value, kind) or wrong_bool or (kind == (int, float) and isinstance(value, bool)):
            raise ParameterError(f"parameter {name!r} must be {_type_name(kind)}, got {value!r} ({type(value).__name__})",
                                 f"pass e.g. -p {name} <{_type_name(kind)}>; use -r {name} VALUE to keep a value as text")
        values[name] = value
    return values
