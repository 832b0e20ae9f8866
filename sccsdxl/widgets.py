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


def options_picker(configs: list[str]):
    """Checkboxes for the sccsdxl.quant options and a dtype; 'Add' appends the configuration to ``configs``."""
    import ipywidgets as w

    from .quant import OPTIONS, parse_config

    dtype = w.Dropdown(options=["bf16", "fp16", "fp32"], value="bf16", description="dtype")
    boxes = {name: w.Checkbox(description=name, value=False, indent=False) for name in OPTIONS}
    shown = w.HTML(value="<br>".join(configs))

    def add(_=None):
        spec = f"{dtype.value}:" + ",".join(n for n, box in boxes.items() if box.value)
        parse_config(spec)  # the same check the headless run applies
        configs.append(spec)
        shown.value = "<br>".join(configs)

    button = w.Button(description="Add configuration")
    button.on_click(add)
    panel = w.VBox([dtype, w.GridBox(list(boxes.values()), layout=w.Layout(grid_template_columns="repeat(3, 200px)")),
                    button, shown])
    panel.add = add  # exposed for tests
    return panel
