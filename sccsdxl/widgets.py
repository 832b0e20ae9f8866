"""JupyterLab controls. Thin wrappers over tested package functions; notebooks build them only when
``interactive`` is True, so headless runs never wait on a widget."""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

from .harness import RunConfig, results_table, run_benchmark


def rerun_panel(config: RunConfig, run: Callable = run_benchmark, batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)):
    """Dropdowns for variant, dtype and batch size and a button that starts a new run with them."""
    import ipywidgets as w
    from IPython.display import display

    from .data import VARIANTS
    from .pipeline import DTYPES

    variant = w.Dropdown(options=list(VARIANTS), value=config.variant, description="variant")
    dtype = w.Dropdown(options=list(DTYPES), value=config.dtype, description="dtype")
    batch = w.Dropdown(options=sorted({*batch_sizes, config.batch_size}), value=config.batch_size, description="batch")
    button = w.Button(description="Run benchmark", button_style="primary")
    output = w.Output()

    def on_click(_=None):
        chosen = replace(config, variant=variant.value, dtype=dtype.value, batch_size=batch.value)
        with output:
            output.clear_output()
            result = run(chosen)
            display(results_table(result))
            print(f"run directory: {result.run_dir}")

    button.on_click(on_click)
    panel = w.VBox([w.HBox([variant, dtype, batch, button]), output])
    panel.on_click = on_click  # exposed for tests
    return panel
