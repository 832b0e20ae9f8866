"""Batch-size and GPU-count sweep: which operating point gives this machine the most samples per second.

Each point is a short loadgen Offline *performance* run through the same harness as 02_baseline, into its
own run directory under ``<output_dir>/runs/``. One-GPU points share one model, loaded once; points with
several GPUs start ``sccsdxl.distributed`` under torchrun. The plan: every batch size on the smallest GPU
count, then every other GPU count at the best batch size found there.

Each finished point is appended at once to ``<output_dir>/sweep/<name>/points.jsonl``; ``<name>`` encodes the
settings, so a re-run with the same settings skips the points it already has (an interrupted sweep resumes)
and a run with other settings starts a new sweep. Out-of-memory points are recorded as such and the sweep
goes on; points that failed otherwise are tried again on the next run.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterable

from .distributed import is_oom, load_runner
from .errors import DeviceError, KitError, OutputError, ParameterError
from .harness import RUN_FILE, RunConfig, list_run_dirs, run_benchmark
from .record import archive_existing, write_json
from .pipeline import free_gpu_memory

SWEEP_DIR = "sweep"
POINTS_FILE = "points.jsonl"
SETTINGS_FILE = "sweep.json"
TUNED_FILE = "tuned.yaml"
SETTING_KEYS = ("variant", "model_source", "model_path", "dtype", "device", "mlperf_round", "target_qps",
                "warmup_batches", "optimizations")
REUSED = ("ok", "oom")  # statuses a re-run keeps; 'error' points are tried again
WIDGET_BATCH_SIZES = (1, 2, 4, 8, 10, 16, 25, 32, 64)
GIB = 2**30


@dataclass
class SweepPoint:
    """One measured operating point."""

    batch_size: int
    gpus: int
    status: str  # ok | oom | error
    samples_per_second: float | None = None
    valid: bool | None = None
    peak_memory_bytes: int | None = None  # torch.cuda.max_memory_allocated (max over ranks); None on the CPU
    run_dir: str | None = None
    wall_seconds: float = 0.0
    error: str | None = None
    samples: int | None = None  # samples in the performance run (the last batch may be partial)
    joules_per_sample: float | None = None  # the GPUs' energy per image (sccsdxl.power; None without NVML)

    @property
    def key(self) -> tuple[int, int]:
        return self.batch_size, self.gpus

    @property
    def usable(self) -> bool:
        return self.status == "ok" and self.valid is True and bool(self.samples_per_second)

    @classmethod
    def from_dict(cls, data: dict) -> "SweepPoint":
        return cls(**{f.name: data.get(f.name) for f in fields(cls) if f.name in data})

    def describe(self) -> str:
        """One line for the log: what this point measured or why it has no number."""
        head = f"batch {self.batch_size} on {self.gpus} GPU{'s' if self.gpus > 1 else ''}"
        if self.status == "oom":
            return f"{head}: out of memory"
        if self.status != "ok":
            return f"{head}: failed ({self.error})"
        memory = f", peak {self.peak_memory_bytes / GIB:.1f} GiB" if self.peak_memory_bytes else ""
        result = {True: "VALID", False: "INVALID"}.get(self.valid, "?")
        return f"{head}: {self.samples_per_second:.4g} samples/s {result}{memory}, {self.wall_seconds:.0f} s"


# ---------------------------------------------------------------- checks

def _positive_ints(name: str, values, example: str) -> list[int]:
    """A non-empty list of integers >= 1, sorted, without repeats."""
    fix = f'pass a YAML list of integers >= 1, e.g. -y "{name}: {example}" (papermill -p cannot pass lists)'
    if not isinstance(values, (list, tuple)) or not values:
        raise ParameterError(f"{name} must be a non-empty list of integers >= 1, got {values!r}", fix)
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or v < 1]
    if bad:
        raise ParameterError(f"{name} must hold integers >= 1; {', '.join(repr(v) for v in bad)} is not one", fix)
    return sorted(set(values))


def check_batch_sizes(values) -> list[int]:
    """Batch sizes to sweep, smallest first."""
    return _positive_ints("batch_sizes", values, "[1, 2, 4, 8]")


def check_gpu_counts(values, device: str, available: int | None = None) -> list[int]:
    """GPU counts to run, none above what this machine has (on the CPU: processes, at most one per core)."""
    counts = _positive_ints("gpus", values, "[1, 2]")
    if device == "cuda":
        if available is None:
            import torch

            available = torch.cuda.device_count()
        what, fix = "GPU(s)", "several nodes: scripts/slurm_multinode.sbatch"
    else:
        available = available or os.cpu_count() or 1
        what, fix = "CPU cores (on the CPU each count is a number of processes)", "use fewer processes"
    too_many = [g for g in counts if g > available]
    if too_many:
        raise DeviceError(f"gpus {too_many} asked for, but this machine has {available} {what}",
                          f'use counts up to {available}, e.g. -y "gpus: [1, {available}]"; {fix}')
    return counts


# ---------------------------------------------------------------- persistence

def sweep_settings(config: RunConfig) -> dict:
    """What makes two points comparable: everything but the batch size and the GPU count."""
    return {k: getattr(config, k) for k in SETTING_KEYS if hasattr(config, k)}


def sweep_name(settings: dict) -> str:
    """Readable and unique per settings: <variant>-<source>-<dtype>-<device>-<hash>."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return f"{settings['variant']}-{settings['model_source']}-{settings['dtype']}-{settings['device']}-{digest}"


def sweep_dir(config: RunConfig) -> Path:
    return Path(config.output_dir).expanduser() / SWEEP_DIR / sweep_name(sweep_settings(config))


def open_sweep(config: RunConfig) -> Path:
    """Create the sweep directory and write its settings; stop early if the output directory is read-only."""
    directory = sweep_dir(config)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        write_json(directory / SETTINGS_FILE, {"name": directory.name, "settings": sweep_settings(config)})
    except OSError as exc:
        raise OutputError(f"cannot write the sweep directory {directory}: {exc.strerror}",
                          "pass a writable directory with -p output_dir <dir>") from None
    return directory


def load_points(directory: Path, settings: dict) -> dict[tuple[int, int], SweepPoint]:
    """Points finished earlier with the same settings; a torn last line (killed mid-write) is skipped."""
    path = Path(directory) / POINTS_FILE
    found: dict[tuple[int, int], SweepPoint] = {}
    if not path.is_file():
        return found
    for line in path.read_text().splitlines():
        try:
            data = json.loads(line)
            point = SweepPoint.from_dict(data)
        except (json.JSONDecodeError, TypeError):
            continue
        if data.get("settings") == settings and point.status in REUSED:
            found[point.key] = point
    return found


def save_point(directory: Path, settings: dict, point: SweepPoint) -> None:
    """Append one finished point and flush it to disk before the next point starts."""
    line = json.dumps({**asdict(point), "settings": settings, "finished": datetime.now().isoformat(timespec="seconds")})
    with open(Path(directory) / POINTS_FILE, "a") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())


# ---------------------------------------------------------------- one point

def _error_text(exc: BaseException) -> str:
    text = getattr(exc, "problem", None) or str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _cuda_device(generator):
    """The generator's GPU, for memory statistics; None on the CPU or when it does not say."""
    import torch

    device = getattr(generator, "device", None)
    if device is None:
        return None
    device = torch.device(device)
    return device if device.type == "cuda" else None


free_memory = free_gpu_memory  # patched in tests


def run_point(config: RunConfig, batch_size: int, generator, show_progress: bool = False) -> SweepPoint:
    """One performance run in this process with an already loaded model; OOM and other errors become the result."""
    import torch

    device = _cuda_device(generator)
    if device is not None:
        torch.cuda.reset_peak_memory_stats(device)
    before = list_run_dirs(config.output_dir)
    started = time.perf_counter()
    run, status, error = None, "ok", None
    try:
        run = run_benchmark(replace(config, batch_size=batch_size), ("performance",), generator=generator,
                            show_progress=show_progress, label=f"sweep-bs{batch_size}-x1")
    except Exception as exc:  # noqa: BLE001 - an OOM (bare, or wrapped in KitError) or a failure at this size
        status, error = ("oom" if is_oom(exc) else "error"), _error_text(exc)
    wall = time.perf_counter() - started
    peak = int(torch.cuda.max_memory_allocated(device)) if device is not None else None
    if status != "ok":
        free_memory()
    made = sorted(list_run_dirs(config.output_dir) - before)
    perf = (run.result("performance") or {}) if run else {}
    if run is not None and getattr(generator, "info", None):
        run.record["model"] = dict(generator.info)
        write_json(run.run_dir / RUN_FILE, run.record)
    return SweepPoint(batch_size, 1, status, perf.get("samples_per_second"), perf.get("valid"), peak,
                      str(run.run_dir) if run else (str(made[-1]) if made else None), round(wall, 2), error,
                      perf.get("samples"), (perf.get("gpu_power") or {}).get("joules_per_sample"))


def distributed_command(config: RunConfig, batch_size: int, gpus: int, result_file: Path,
                        python: str | None = None) -> list[str]:
    """torchrun on this node, one process per GPU, running sccsdxl.distributed for one performance run."""
    command = [python or sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(gpus),
               "-m", "sccsdxl.distributed"]
    for field in fields(RunConfig):
        value = batch_size if field.name == "batch_size" else getattr(config, field.name)
        command += ["--" + field.name.replace("_", "-"), str(value)]
    return command + ["--modes", "performance", "--no-progress", "--label", f"sweep-bs{batch_size}-x{gpus}",
                      "--result-file", str(result_file)]


def launch(command: list[str], echo: Callable[[str], None] | None = None) -> tuple[int, str]:
    """Run a command with the kit importable, pass its output through, return (exit code, last lines)."""
    package_root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    tail: deque[str] = deque(maxlen=80)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        for line in proc.stdout:
            tail.append(line.rstrip())
            if echo:
                echo(line.rstrip())
        return proc.wait(), "\n".join(tail)
    except BaseException:  # interrupted: stop torchrun (it stops its workers) before giving up
        proc.terminate()
        proc.wait(timeout=60)
        raise


def run_distributed_point(config: RunConfig, batch_size: int, gpus: int, show_progress: bool = False,
                          runner: Callable = launch) -> SweepPoint:
    """One performance run over ``gpus`` processes (torchrun); its result file says what happened."""
    result_file = sweep_dir(config) / f"result-bs{batch_size}-x{gpus}.json"
    result_file.unlink(missing_ok=True)
    started = time.perf_counter()
    code, tail = runner(distributed_command(config, batch_size, gpus, result_file), print if show_progress else None)
    wall = time.perf_counter() - started
    result = json.loads(result_file.read_text()) if result_file.is_file() else {}
    result_file.unlink(missing_ok=True)
    perf = (result.get("results") or {}).get("performance") or {}
    if code == 0 and result.get("ok"):
        return SweepPoint(batch_size, gpus, "ok", perf.get("samples_per_second"), perf.get("valid"),
                          result.get("peak_memory_bytes"), result.get("run_dir"), round(wall, 2),
                          samples=perf.get("samples"),
                          joules_per_sample=(perf.get("gpu_power") or {}).get("joules_per_sample"))
    oom = bool(result.get("oom")) or "OutOfMemoryError" in tail or "out of memory" in tail.lower()
    last = [line for line in tail.splitlines() if line.strip()][-3:]
    error = (result.get("error") or "").split("\n")[0] or f"torchrun exited with {code}: {' | '.join(last)}"
    return SweepPoint(batch_size, gpus, "oom" if oom else "error", run_dir=result.get("run_dir"),
                      wall_seconds=round(wall, 2), error=error)


# ---------------------------------------------------------------- the sweep

def plan_devices(config: RunConfig, gpus: Iterable[int]) -> list[int]:
    """Checked GPU counts for this configuration's device."""
    from .pipeline import resolve_device

    return check_gpu_counts(list(gpus), resolve_device(config.device, config.model_source))


def run_sweep(config: RunConfig, batch_sizes, gpus=(1,), generator=None, show_progress: bool = False,
              echo: Callable[[str], None] = print, distributed_runner: Callable = launch) -> list[SweepPoint]:
    """Every batch size on the smallest GPU count, then the other GPU counts at the best batch size."""
    config = replace(config, batch_size=1).validate()
    sizes, counts = check_batch_sizes(batch_sizes), plan_devices(config, gpus)
    directory, settings = open_sweep(config), sweep_settings(config)
    done = load_points(directory, settings)
    echo(f"sweep {directory} ({len(done)} earlier points with these settings)")
    owned = generator is None
    points = []
    for size in sizes:
        if (size, counts[0]) in done:
            points.append(done[(size, counts[0])])
            echo(f"{points[-1].describe()} (from {POINTS_FILE})")
            continue
        if counts[0] == 1:
            if generator is None:
                echo("loading the model (once for every one-GPU point)")
                generator = load_runner(config)
            point = run_point(config, size, generator, show_progress)
        else:
            point = run_distributed_point(config, size, counts[0], show_progress, distributed_runner)
        save_point(directory, settings, point)
        points.append(point)
        echo(point.describe())
    if owned and generator is not None:
        generator = None  # the multi-GPU runs need every GPU's memory
        free_memory()
    points += _scale_out(config, points, counts, done, directory, settings, show_progress, echo, distributed_runner)
    return points


def _scale_out(config, points, counts, done, directory, settings, show_progress, echo, runner) -> list[SweepPoint]:
    """The other GPU counts at the best batch size of the first count."""
    best = best_point(points, gpus=counts[0])
    if len(counts) > 1 and best is None:
        echo(f"no valid point on {counts[0]} GPU(s): the runs on {counts[1:]} GPUs are skipped")
        return []
    scaled = []
    for count in counts[1:]:
        key = (best.batch_size, count)
        point = done.get(key) or run_distributed_point(config, best.batch_size, count, show_progress, runner)
        if key not in done:
            save_point(directory, settings, point)
        scaled.append(point)
        echo(point.describe() + (f" (from {POINTS_FILE})" if key in done else ""))
    return scaled


def best_point(points: Iterable[SweepPoint], gpus: int | None = None) -> SweepPoint | None:
    """The valid point with the most samples/s (the smaller batch size on a tie); None if none is valid."""
    usable = [p for p in points if p.usable and (gpus is None or p.gpus == gpus)]
    return max(usable, key=lambda p: (p.samples_per_second, -p.batch_size, -p.gpus), default=None)


def require_best(points: list[SweepPoint]) -> SweepPoint:
    """The best point, or a message that says why there is none."""
    best = best_point(points)
    if best is None:
        failed = "; ".join(p.describe() for p in points) or "no points"
        raise KitError(f"no batch size gave a valid performance run ({failed})",
                       'try smaller batch sizes, e.g. -y "batch_sizes: [1, 2]", and read the errors in the run '
                       "directories")
    return best


# ---------------------------------------------------------------- results

def last_batch(samples: int | None, batch_size: int) -> str:
    """'full' when the batch size divides the run's samples; else the partial last batch ('2 of 8'), which
    makes the point understate what that batch size sustains on a longer run."""
    if not samples:
        return "-"
    partial = samples % batch_size
    return "full" if partial == 0 else f"{partial} of {batch_size}"


def points_table(points: list[SweepPoint], best: SweepPoint | None = None):
    """One row per point: throughput, per-GPU throughput, scaling against one GPU, peak memory, validity."""
    import pandas as pd

    single = {p.batch_size: p.samples_per_second for p in points if p.gpus == 1 and p.usable}
    rows = []
    for p in points:
        sps = p.samples_per_second if p.status == "ok" else None
        base = single.get(p.batch_size)
        rows.append({
            "batch size": p.batch_size, "GPUs": p.gpus, "status": p.status, "samples/s": sps,
            "per GPU": sps / p.gpus if sps else None,
            "scaling": sps / (base * p.gpus) if sps and base and p.gpus > 1 else None,
            "peak GiB": round(p.peak_memory_bytes / GIB, 2) if p.peak_memory_bytes else None,
            "J/sample": p.joules_per_sample,
            "result": {True: "VALID", False: "INVALID"}.get(p.valid, "-"),
            "last batch": last_batch(p.samples, p.batch_size), "wall s": p.wall_seconds,
            "best": "*" if best is not None and p.key == best.key else "",
            "run": Path(p.run_dir).name if p.run_dir else "",
        })
    return pd.DataFrame(rows)


def markdown_table(points: list[SweepPoint], best: SweepPoint | None = None) -> str:
    """The points table as GitHub markdown (no extra dependency)."""
    table = points_table(points, best)

    def cell(value) -> str:
        if value is None or (isinstance(value, float) and value != value):
            return "-"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.astype(object).itertuples(index=False)]
    return "\n".join(lines) + "\n"


def plot_sweep(points: list[SweepPoint]):
    """Throughput and peak memory against batch size (first GPU count), and throughput against GPU count."""
    import matplotlib.pyplot as plt

    counts = sorted({p.gpus for p in points}) or [1]
    fig, axes = plt.subplots(1, 2 if len(counts) > 1 else 1, figsize=(12 if len(counts) > 1 else 7, 4.2), squeeze=False)
    first = [p for p in points if p.gpus == counts[0]]
    _plot_batch_sizes(axes[0][0], first, best_point(first), counts[0])
    if len(counts) > 1:
        _plot_gpu_counts(axes[0][1], points, best_point(first))
    fig.tight_layout()
    return fig


def _plot_batch_sizes(ax, points: list[SweepPoint], best: SweepPoint | None, gpus: int) -> None:
    ok = sorted((p for p in points if p.status == "ok"), key=lambda p: p.batch_size)
    ax.plot([p.batch_size for p in ok], [p.samples_per_second for p in ok], "o-", color="tab:blue", label="samples/s")
    for p in (p for p in points if p.status != "ok"):
        ax.plot(p.batch_size, 0, "x", color="tab:red", markersize=10, clip_on=False)
        ax.annotate("OOM" if p.status == "oom" else "error", (p.batch_size, 0), textcoords="offset points",
                    xytext=(0, 8), ha="center", color="tab:red")
    if best is not None and best.gpus == gpus:
        ax.plot(best.batch_size, best.samples_per_second, "*", color="gold", markersize=20, markeredgecolor="black",
                label=f"best: batch {best.batch_size}")
    sizes = sorted({p.batch_size for p in points})
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.margins(x=0.08)
    ax.set_xlabel("batch size")
    ax.set_ylabel("samples/s")
    ax.set_ylim(0, 1.3 * max([p.samples_per_second for p in ok] or [1.0]))
    ax.set_title(f"Throughput and peak memory, {gpus} GPU{'s' if gpus > 1 else ''}")
    handles, labels = ax.get_legend_handles_labels()
    memory = [(p.batch_size, p.peak_memory_bytes / GIB) for p in ok if p.peak_memory_bytes]
    if memory:
        twin = ax.twinx()
        twin.plot(*zip(*memory), "s--", color="tab:gray", label="peak GPU memory")
        twin.set_ylabel("peak GPU memory (GiB)")
        twin.set_ylim(0, 1.3 * max(m for _, m in memory))
        ax.set_zorder(twin.get_zorder() + 1)  # the throughput line and the best star above the memory line
        ax.patch.set_visible(False)
        more = twin.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    else:
        ax.text(0.99, 0.02, "peak GPU memory: n/a (CPU)", transform=ax.transAxes, ha="right", fontsize=8, color="gray")
    ax.legend(handles, labels, loc="upper left", ncol=len(labels))


def _plot_gpu_counts(ax, points: list[SweepPoint], best: SweepPoint | None) -> None:
    size = best.batch_size if best is not None else max(p.batch_size for p in points)
    ok = sorted((p for p in points if p.batch_size == size and p.usable), key=lambda p: p.gpus)
    if ok:
        ax.plot([p.gpus for p in ok], [p.samples_per_second for p in ok], "o-", label=f"batch {size}")
        top_point = max(ok, key=lambda p: p.samples_per_second)
        ax.plot(top_point.gpus, top_point.samples_per_second, "*", color="gold", markersize=20, markeredgecolor="black",
                label=f"best: {top_point.gpus} GPUs")
        unit = ok[0].samples_per_second / ok[0].gpus
        top = max(p.gpus for p in ok)
        ax.plot([1, top], [unit, unit * top], ":", color="gray", label="linear scaling")
    ax.set_xlabel("GPUs")
    ax.set_ylabel("samples/s")
    ax.set_ylim(0, 1.3 * max([p.samples_per_second for p in ok] + [0.0]) or 1.0)
    ax.set_xticks(sorted({p.gpus for p in points}))
    ax.set_title("Scaling over GPUs")
    ax.legend(loc="upper left")


def _tuned_values(config: RunConfig, best: SweepPoint) -> dict:
    """The parameters tuned.yaml sets: the model as swept and the best batch size."""
    values = {"model_source": config.model_source, "dtype": config.dtype, "device": config.device,
              "batch_size": best.batch_size}
    if config.model_path:
        values["model_path"] = config.model_path
    if getattr(config, "optimizations", ""):
        values["optimizations"] = config.optimizations
    return values


def _same_tuned(path: Path, values: dict, best: SweepPoint) -> bool:
    """True when tuned.yaml already holds these values from the same run."""
    import yaml

    try:
        text = path.read_text()
        return yaml.safe_load(text) == values and f"#   run:   {best.run_dir}\n" in text
    except (OSError, yaml.YAMLError):
        return False


def write_tuned(config: RunConfig, best: SweepPoint, directory: Path | None = None) -> tuple[Path, Path | None]:
    """Write <output_dir>/tuned.yaml for -f in the other notebooks; an earlier one is kept under a dated name."""
    import yaml

    out = Path(config.output_dir).expanduser()
    path, archived = out / TUNED_FILE, None
    values = _tuned_values(config, best)
    if path.exists() and _same_tuned(path, values, best):
        return path, None  # a resumed sweep with the same answer: nothing new to write
    archived = archive_existing(path)
    memory = f", peak GPU memory {best.peak_memory_bytes / GIB:.1f} GiB" if best.peak_memory_bytes else ""
    gpus = best.gpus if best.gpus > 1 else "N"
    header = [
        f"# Best operating point found by 03_batch_size_sweep on {datetime.now():%Y-%m-%d %H:%M}",
        f"#   {best.samples_per_second:.4g} samples/s at batch_size {best.batch_size} on {best.gpus} GPU(s){memory}",
        f"#   sweep: {directory or sweep_dir(config)}",
        f"#   run:   {best.run_dir}",
        f"# Use it: papermill notebooks/02_baseline.ipynb out.ipynb -f {path}",
        f"# On {gpus} GPUs: torchrun --nproc-per-node {gpus} -m sccsdxl.distributed -f {path} "
        f"--variant {config.variant}",
    ]
    try:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(header) + "\n" + yaml.safe_dump(values, sort_keys=False))
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror}",
                          "pass a writable directory with -p output_dir <dir>") from None
    return path, archived


def sweep_controls(batch_sizes: list[int], gpus: list[int], max_gpus: int):
    """JupyterLab: pick batch sizes and GPU counts, then run the next cell (which reads ``.chosen()``)."""
    import ipywidgets as w

    sizes = w.SelectMultiple(options=sorted({*WIDGET_BATCH_SIZES, *batch_sizes}), value=tuple(sorted(batch_sizes)),
                             description="batch sizes", rows=8)
    counts = w.SelectMultiple(options=list(range(1, max(max_gpus, *gpus) + 1)), value=tuple(sorted(gpus)),
                              description="GPUs", rows=min(8, max(max_gpus, *gpus)))
    hint = w.HTML("Ctrl/Shift-click to pick several, then run the next cell. Larger batch sizes need more GPU memory.")
    panel = w.VBox([w.HBox([sizes, counts]), hint])
    panel.chosen = lambda: (sorted(sizes.value), sorted(counts.value))
    return panel


# ---------------------------------------------------------------- command line

def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sccsdxl.sweep",
                                     description="The 03_batch_size_sweep notebook's sweep from a shell.")
    parser.add_argument("--batch-sizes", type=_int_list, default=[1, 2, 4, 8], help="e.g. 1,2,4,8,16,32")
    parser.add_argument("--gpus", type=_int_list, default=[1],
                        help="GPU counts, e.g. 1,2,4 (the others run at the first count's best batch size)")
    defaults = RunConfig()
    for field in fields(RunConfig):
        if field.name != "batch_size":
            default = getattr(defaults, field.name)
            parser.add_argument("--" + field.name.replace("_", "-"), type=type(default), default=default,
                                help=f"default: {default!r}")
    parser.add_argument("--table", default=None, help="markdown results file (default <sweep dir>/results.md)")
    parser.add_argument("--progress", action="store_true", help="progress bars and the distributed runs' output")
    parser.add_argument("--report", action="store_true",
                        help="run nothing: the table of the points finished so far with these settings")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) a sweep, write tuned.yaml, the table and the plot, print the table."""
    args = build_parser().parse_args(argv)
    config = RunConfig(**{f.name: getattr(args, f.name) for f in fields(RunConfig) if f.name != "batch_size"})
    directory = sweep_dir(config)
    table_path = Path(args.table) if args.table else directory / "results.md"
    if args.report:
        points = sorted(load_points(directory, sweep_settings(config)).values(), key=lambda p: (p.gpus, p.batch_size))
        write_report(points, best_point(points), directory, table_path)
        return 0
    try:
        points = run_sweep(config, args.batch_sizes, args.gpus, show_progress=args.progress)
        best = require_best(points)
        tuned, archived = write_tuned(config, best)
    except KitError as exc:
        print(f"sccsdxl: {exc.message}", file=sys.stderr)
        return 2
    write_report(points, best, directory, table_path)
    print(f"best: {best.describe()}")
    print(f"tuned parameters: {tuned}" + (f" (previous kept as {archived})" if archived else ""))
    return 0


def write_report(points: list[SweepPoint], best: SweepPoint | None, directory: Path, table_path: Path) -> None:
    """The markdown table and the plot, next to each other (and the plot in the sweep directory too)."""
    table = markdown_table(points, best)
    table_path.parent.mkdir(parents=True, exist_ok=True)
    table_path.write_text(table)
    print(table)
    if points:
        figure = plot_sweep(points)
        directory.mkdir(parents=True, exist_ok=True)
        for path in {directory / "sweep.png", table_path.with_suffix(".png")}:
            figure.savefig(path, dpi=120)
    print(f"sweep: {directory}\ntable: {table_path}")


if __name__ == "__main__":
    sys.exit(main())
