"""The loadgen harness: a QSL over a variant's samples and an Offline SUT that batches them through the pipeline.

Every run goes into a new directory ``<output_dir>/runs/<timestamp>-<label>/``:
  run.json       parameters, versions, machine, and per-mode results (samples/s, validity)
  user.conf      the loadgen user config the run loaded
  samples.tsv    the exact caption rows served (QSL index -> row of captions_source.tsv)
  performance/   loadgen logs of the performance run
  accuracy/      loadgen logs of the accuracy run, with every image in mlperf_log_accuracy.json
"""
from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from . import constants as C
from .data import SampleSet, sample_set
from .errors import KitError, OutputError, ParameterError
from .power import PowerMonitor, visible_gpu_uuids
from .record import write_json
from .rounds import Round, get_round

MODES = ("performance", "accuracy")
RUN_FILE = "run.json"
USER_CONF = "user.conf"
DEFAULT_TARGET_QPS = 1.0


class ImageGenerator(Protocol):
    """What the SUT needs from a model: captions in, (B,H,W,3) uint8 images out."""

    response_shape: tuple[int, int, int]

    def generate(self, prompts: list[str]) -> np.ndarray: ...


@dataclass
class RunConfig:
    """Everything that defines one benchmark run (notebook parameters minus presentation)."""

    variant: str = "main"
    model_source: str = "hf"
    model_path: str = ""
    dtype: str = "fp16"
    batch_size: int = 1
    device: str = "auto"
    mlperf_round: str = "v4.1"
    output_dir: str = "output"
    target_qps: float = 0.0  # 0: DEFAULT_TARGET_QPS (only matters for the full variant's 600 s run)
    warmup_batches: int = 1
    optimizations: str = ""  # sccsdxl.quant options, e.g. "fuse_qkv,compile,fp8"
    data_dir: str = ""  # where 01_setup put the weights ("" = $SCCSDXL_DATA_DIR or ~/.cache/sccsdxl)

    def validate(self) -> "RunConfig":
        """Stop on any bad value before a model is loaded or GPU time is spent."""
        from .data import variant_size
        from .pipeline import DEVICES, DTYPES, SOURCES

        variant_size(self.variant)
        checks = [
            (self.model_source in SOURCES, f"unknown model_source {self.model_source!r}",
             f"use one of {', '.join(SOURCES)}"),
            (self.dtype in DTYPES, f"unknown dtype {self.dtype!r}", f"use one of {', '.join(DTYPES)}"),
            (self.device in DEVICES, f"unknown device {self.device!r}", f"use one of {', '.join(DEVICES)}"),
            (isinstance(self.batch_size, int) and not isinstance(self.batch_size, bool) and self.batch_size >= 1,
             f"batch_size must be an integer >= 1, got {self.batch_size!r}", "pass e.g. -p batch_size 8"),
            (isinstance(self.warmup_batches, int) and self.warmup_batches >= 0,
             f"warmup_batches must be an integer >= 0, got {self.warmup_batches!r}", "pass e.g. -p warmup_batches 1"),
            (isinstance(self.target_qps, (int, float)) and self.target_qps >= 0,
             f"target_qps must be a number >= 0, got {self.target_qps!r}",
             "pass the expected samples/s, e.g. -p target_qps 1.5 (0 = default)"),
        ]
        for ok, problem, fix in checks:
            if not ok:
                raise ParameterError(problem, fix)
        get_round(self.mlperf_round)
        from .pipeline import resolve_device

        from .quant import check_optimizations, parse_optimizations

        device = resolve_device(self.device, self.model_source)  # no GPU for a model that needs one: stop now
        check_optimizations(parse_optimizations(self.optimizations), self.dtype, device)
        check_writable(self.output_dir)
        if self.model_source == "mlcommons":
            from .pipeline import check_mlcommons_dir

            check_mlcommons_dir(self.model_path)
        return self


def check_writable(directory: str | Path) -> Path:
    """Stop before any work if run directories cannot be created under ``directory``."""
    import tempfile

    path = Path(directory).expanduser()
    try:
        (path / "runs").mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path / "runs"):
            pass
    except OSError as exc:
        raise OutputError(f"output_dir {str(path)!r} cannot be written: {exc.strerror}",
                          "pass a writable directory with -p output_dir <dir>") from None
    return path


def user_conf_text(n_samples: int, variant: str, target_qps: float) -> str:
    """user.conf for the variant: SCC short-run settings, or the closed-division minimums for 'full'."""
    key = f"{C.MODEL_NAME}.{C.SCENARIO}"
    lines = [f"# written by sccsdxl for variant {variant!r} ({n_samples} samples)",
             f"{key}.target_qps = {target_qps or DEFAULT_TARGET_QPS}"]
    if n_samples < C.DATASET_ROWS:  # SCC short run: one Offline query of exactly the variant's samples
        lines += [f"{key}.min_query_count = {n_samples}", f"{key}.max_query_count = {n_samples}",
                  f"{key}.min_duration = 0", f"{key}.sample_concatenate_permutation = 0",
                  f"{key}.performance_sample_count_override = {n_samples}"]
    else:
        lines += ["# full: loadgen's built-in mlperf.conf rules apply (5000 queries, >= 600 s);",
                  "# set target_qps to your measured samples/s so that the query lasts over 600 s"]
    return "\n".join(lines) + "\n"


def new_run_dir(output_dir: str | Path, label: str) -> Path:
    """A fresh directory under <output_dir>/runs; an earlier run is never reused or overwritten."""
    from .record import unique_dir

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return unique_dir(Path(output_dir).expanduser() / "runs", f"{stamp}-{label}", "a run directory", first_suffix=0)


def list_run_dirs(output_dir: str | Path) -> set[Path]:
    """The run directories under <output_dir>/runs now (to find the one a call has just made)."""
    root = Path(output_dir).expanduser() / "runs"
    return set(root.iterdir()) if root.is_dir() else set()


def parse_detail_log(path: Path) -> dict:
    """The key/value records of mlperf_log_detail.txt (``:::MLLOG {json}`` lines); errors collected."""
    values: dict = {"errors": []}
    if not path.is_file():
        return values
    for line in path.read_text(errors="replace").splitlines():
        if not line.startswith(":::MLLOG"):
            continue
        record = json.loads(line[len(":::MLLOG"):])
        if record.get("metadata", {}).get("is_error"):
            values["errors"].append(record.get("value"))
        values[record["key"]] = record["value"]
    return values


class OfflineSUT:
    """Offline SUT: splits loadgen's query into batches; one worker thread per generator takes the next batch
    as soon as its generator is free (so a slower replica never holds the others back), answers per batch."""

    def __init__(self, generators: ImageGenerator | list[ImageGenerator], samples: SampleSet, batch_size: int,
                 progress: Callable[[int], None] | None = None):
        self.generators = generators if isinstance(generators, list) else [generators]
        self.samples = samples
        self.batch_size = batch_size
        self.progress = progress or (lambda n: None)
        self.work: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        self.workers = [threading.Thread(target=self._serve, args=(g,), daemon=True, name=f"sccsdxl-sut-{i}")
                        for i, g in enumerate(self.generators)]
        for worker in self.workers:
            worker.start()

    def issue_queries(self, query_samples) -> None:
        items = list(query_samples)
        for start in range(0, len(items), self.batch_size):
            self.work.put(items[start:start + self.batch_size])

    def flush_queries(self) -> None:
        pass

    def close(self) -> None:
        for _ in self.workers:
            self.work.put(None)
        for worker in self.workers:
            worker.join()

    def _serve(self, generator: ImageGenerator) -> None:
        import mlperf_loadgen as lg

        while (batch := self.work.get()) is not None:
            if self.error is not None:  # answer empty so loadgen can finish; the error is raised after the run
                lg.QuerySamplesComplete([lg.QuerySampleResponse(s.id, 0, 0) for s in batch])
                continue
            try:
                images = generator.generate([self.samples.caption(s.index) for s in batch])
                images = np.ascontiguousarray(images, dtype=np.uint8)
                if len(images) != len(batch):
                    raise RuntimeError(f"the model returned {len(images)} images for {len(batch)} prompts")
                responses = [lg.QuerySampleResponse(s.id, img.ctypes.data, img.nbytes)
                             for s, img in zip(batch, images)]
                lg.QuerySamplesComplete(responses)  # loadgen copies the bytes during this call
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                with self.lock:
                    self.error = self.error or exc
                lg.QuerySamplesComplete([lg.QuerySampleResponse(s.id, 0, 0) for s in batch])
            with self.lock:
                self.progress(len(batch))


@dataclass
class ModeResult:
    mode: str
    log_dir: str
    samples_per_second: float | None
    valid: bool | None
    samples: int
    wall_seconds: float
    seeds: dict = field(default_factory=dict)
    errors: list = field(default_factory=list)
    peak_gpu_memory_bytes: int | None = None
    gpu_power: dict | None = None  # sccsdxl.power's record of the run: energy, power, SM clock, power-capped share


# loadgen config keys -> TestSettings attributes (value converter). loadgen's FromConfig may load a user
# config only once per process (a second load marks the next log "not valid for official submission"), so
# the harness loads the built-in mlperf.conf through loadgen and applies user.conf / audit.config itself.
CONF_KEYS: dict[str, tuple[str, Callable]] = {
    "target_qps": ("offline_expected_qps", float),
    "min_query_count": ("min_query_count", int),
    "max_query_count": ("max_query_count", int),
    "min_duration": ("min_duration_ms", int),
    "max_duration": ("max_duration_ms", int),
    "performance_sample_count_override": ("performance_sample_count_override", int),
    "sample_concatenate_permutation": ("sample_concatenate_permutation", lambda v: int(v) != 0),
    "qsl_rng_seed": ("qsl_rng_seed", int),
    "sample_index_rng_seed": ("sample_index_rng_seed", int),
    "schedule_rng_seed": ("schedule_rng_seed", int),
    "accuracy_log_rng_seed": ("accuracy_log_rng_seed", int),
    "accuracy_log_probability": ("accuracy_log_probability", lambda v: float(v) * 0.01),
    "accuracy_log_sampling_target": ("accuracy_log_sampling_target", int),
    "performance_issue_unique": ("performance_issue_unique", lambda v: int(v) != 0),
    "performance_issue_same": ("performance_issue_same", lambda v: int(v) != 0),
    "performance_issue_same_index": ("performance_issue_same_index", int),
    "mode": ("mode", int),
}


def read_conf(path: Path, model: str = C.MODEL_NAME, scenario: str = C.SCENARIO) -> dict[str, str]:
    """Values of a loadgen config file for one model and scenario, with loadgen's wildcard precedence."""
    entries: dict[str, str] = {}
    for number, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, value = (part.strip() for part in line.partition("="))
        if not sep or name.count(".") != 2 or not value:
            raise ParameterError(f"{path}:{number}: expected 'model.scenario.key = value', got {raw!r}",
                                 "fix that line of the config file")
        entries[name] = value
    found: dict[str, str] = {}
    for m, s in (("*", "*"), (model, "*"), ("*", scenario), (model, scenario)):  # later wins
        prefix = f"{m}.{s}."
        found.update({k[len(prefix):]: v for k, v in entries.items() if k.startswith(prefix)})
    return found


def apply_conf(settings, path: Path) -> None:
    """Set the keys of a user.conf or audit.config on loadgen TestSettings."""
    import mlperf_loadgen as lg

    modes = {0: lg.TestMode.SubmissionRun, 1: lg.TestMode.AccuracyOnly, 2: lg.TestMode.PerformanceOnly,
             3: lg.TestMode.FindPeakPerformance}
    for key, value in read_conf(path).items():
        if key not in CONF_KEYS:
            continue  # keys of other scenarios (Server, SingleStream, ...) do not apply to Offline
        attr, convert = CONF_KEYS[key]
        try:
            converted = convert(value)
        except ValueError:
            raise ParameterError(f"{path}: {key} = {value!r} is not a number", "fix the value in that file") from None
        setattr(settings, attr, modes[converted] if attr == "mode" else converted)


def loadgen_settings(mode: str, user_conf: Path, rnd: Round, audit_config: Path | None = None):
    """TestSettings: loadgen's built-in mlperf.conf, then user.conf, the round's seeds, then audit.config."""
    import mlperf_loadgen as lg

    settings = lg.TestSettings()
    settings.scenario = lg.TestScenario.Offline
    settings.FromConfig(str(user_conf), C.MODEL_NAME, C.SCENARIO, 0)  # conf_type 0: built-in mlperf.conf only
    apply_conf(settings, user_conf)
    settings.mode = lg.TestMode.PerformanceOnly if mode == "performance" else lg.TestMode.AccuracyOnly
    for name, value in rnd.seeds.items():  # the chosen round's seeds, whatever round loadgen was built for
        setattr(settings, name, value)
    if audit_config is not None:
        apply_conf(settings, audit_config)
    return settings


def run_loadgen(generator: ImageGenerator | list[ImageGenerator], samples: SampleSet, mode: str, run_dir: Path, batch_size: int,
                rnd: Round, user_conf: Path, audit_config: Path | None = None, show_progress: bool = True,
                log_name: str | None = None) -> ModeResult:
    """One loadgen Offline test (performance or accuracy) into ``run_dir/<mode>``."""
    import mlperf_loadgen as lg
    from tqdm.auto import tqdm

    if mode not in MODES:
        raise ParameterError(f"unknown mode {mode!r}", f"use one of {', '.join(MODES)}")
    log_dir = Path(run_dir) / (log_name or mode)
    log_dir.mkdir(parents=True, exist_ok=False)
    settings = loadgen_settings(mode, user_conf, rnd, audit_config)
    log_settings = lg.LogSettings()
    log_settings.log_output.outdir = str(log_dir)
    log_settings.log_output.copy_summary_to_stdout = False
    log_settings.enable_trace = False

    expected = len(samples) if mode == "accuracy" else max(settings.min_query_count, 1)
    bar = tqdm(total=expected, desc=f"{mode} ({len(samples)} samples, batch {batch_size})", unit="sample",
               disable=not show_progress, mininterval=1.0)
    gpu = _cuda_ready()
    if gpu:
        import torch

        torch.cuda.reset_peak_memory_stats()
    power = PowerMonitor(visible_gpu_uuids()) if gpu else None
    started = time.perf_counter()

    def progress(n: int) -> None:
        bar.update(n)
        bar.set_postfix(samples_per_s=f"{bar.n / max(time.perf_counter() - started, 1e-9):.3f}", refresh=False)

    sut_impl = OfflineSUT(generator, samples, batch_size, progress)
    sut = lg.ConstructSUT(sut_impl.issue_queries, sut_impl.flush_queries)
    qsl = lg.ConstructQSL(len(samples), len(samples), lambda ids: None, lambda ids: None)
    try:
        with power if power is not None else contextlib.nullcontext():
            lg.StartTestWithLogSettings(sut, qsl, settings, log_settings)
    finally:
        sut_impl.close()
        lg.DestroyQSL(qsl)
        lg.DestroySUT(sut)
        bar.close()
    wall = time.perf_counter() - started
    if sut_impl.error is not None:
        err = sut_impl.error
        if isinstance(err, KitError):
            raise err
        raise KitError(f"the model failed during the {mode} run ({type(err).__name__}: {err}); "
                       f"loadgen logs are kept in {log_dir}",
                       "see the message above; for out-of-memory errors lower -p batch_size") from err
    detail = parse_detail_log(log_dir / "mlperf_log_detail.txt")
    validity = detail.get("result_validity")
    served = int(detail.get("qsl_reported_total_count", len(samples)) if mode == "accuracy"
                 else detail.get("effective_samples_per_query", detail.get("generated_samples_per_query", 0)))
    return ModeResult(
        mode=mode, log_dir=str(log_dir),
        samples_per_second=detail.get("result_samples_per_second") if mode == "performance" else None,
        valid=(validity == "VALID") if mode == "performance" else None,
        samples=served,
        wall_seconds=round(wall, 3),
        seeds={k: detail.get(f"effective_{k}") for k in ("qsl_rng_seed", "sample_index_rng_seed", "schedule_rng_seed")},
        errors=detail.get("errors", []),
        peak_gpu_memory_bytes=_peak_gpu_memory() if gpu else None,
        gpu_power=power.summary(served) if power is not None else None,
    )


def _cuda_ready() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _peak_gpu_memory() -> int:
    import torch

    return int(max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())))


def plan_batch_shapes(generator, batch_size: int, n_samples: int) -> None:
    """Compiled models keep one graph per batch shape: serve full batches and the run's one partial batch
    (n_samples % batch_size, compiled during warm-up) as they are, and pad any other short batch."""
    from .quant import is_compiled

    runner = getattr(generator, "runner", generator)  # a distributed LocalReplica wraps its runner
    if is_compiled(getattr(runner, "info", {})) and hasattr(runner, "pad_to"):
        runner.pad_to = batch_size
        runner.exact_sizes = {n_samples % batch_size} - {0}


def warm_up(generator: ImageGenerator, batch_size: int, batches: int, partial: int = 0) -> float:
    """The reference's warm-up: full batches of a throwaway prompt before loadgen starts, then one batch of the
    run's partial size (a compiled model builds that graph here, not in the timed run); returns seconds."""
    started = time.perf_counter()
    for _ in range(batches):
        generator.generate([C.WARMUP_PROMPT] * batch_size)
    if batches and partial:
        generator.generate([C.WARMUP_PROMPT] * partial)
    return time.perf_counter() - started


def warm_up_all(generators: list[ImageGenerator], batch_size: int, batches: int, partial: int = 0) -> float:
    """Warm every replica at the same time (one thread each); returns the wall seconds."""
    from concurrent.futures import ThreadPoolExecutor

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(len(generators), 1)) as pool:
        list(pool.map(lambda g: warm_up(g, batch_size, batches, partial), generators))
    return round(time.perf_counter() - started, 2)


def environment_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("sccsdxl", "torch", "diffusers", "transformers", "mlcommons-loadgen", "open_clip_torch", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    import platform

    out["python"] = platform.python_version()
    return out


@dataclass
class BenchmarkRun:
    """A finished run: where it lives and what it measured."""

    run_dir: Path
    record: dict

    def result(self, mode: str) -> dict | None:
        return self.record["results"].get(mode)


def run_benchmark(config: RunConfig, modes: tuple[str, ...] = MODES,
                  generator: ImageGenerator | list[ImageGenerator] | None = None,
                  show_progress: bool = True, label: str | None = None) -> BenchmarkRun:
    """Load the model, then run the requested loadgen modes into a new run directory."""
    from .system import describe_machine

    config.validate()
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ParameterError(f"unknown modes {unknown or modes}", f"use a subset of {MODES}")
    rnd = get_round(config.mlperf_round)
    samples = sample_set(config.variant)
    model_info: dict = {}
    if generator is None:  # load before making the run directory: a missing model leaves nothing behind
        from .pipeline import make_runner

        loaded = time.perf_counter()
        generator = make_runner(config.model_source, config.dtype, config.device, config.model_path or None,
                                cache_dir=str(Path(config.output_dir) / "cache"), optimizations=config.optimizations,
                                data_dir=config.data_dir)
        model_info = {**generator.info, "load_seconds": round(time.perf_counter() - loaded, 2)}
    run_dir = new_run_dir(config.output_dir, label or f"{config.variant}-{config.model_source}-{config.dtype}-bs{config.batch_size}")
    samples.save(run_dir)
    user_conf = run_dir / USER_CONF
    user_conf.write_text(user_conf_text(len(samples), config.variant, config.target_qps))
    record = {
        "kind": "sccsdxl-run", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_dir": str(run_dir), "config": asdict(config), "round": rnd.name, "samples": len(samples),
        "versions": environment_versions(), "machine": describe_machine(), "model": model_info, "results": {},
        "valid_for_accuracy": config.model_source in ("hf", "mlcommons"),
    }
    write_json(run_dir / RUN_FILE, record)
    generators = generator if isinstance(generator, list) else [generator]
    for g in generators:
        plan_batch_shapes(g, config.batch_size, len(samples))
    record["warmup_seconds"] = warm_up_all(generators, config.batch_size, config.warmup_batches,
                                           partial=len(samples) % config.batch_size)
    for mode in modes:
        result = run_loadgen(generator, samples, mode, run_dir, config.batch_size, rnd, user_conf,
                             show_progress=show_progress)
        record["results"][mode] = asdict(result)
        write_json(run_dir / RUN_FILE, record)
    return BenchmarkRun(run_dir, record)


def load_run(run_dir: str | Path) -> BenchmarkRun:
    """A run directory written earlier."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise KitError(f"{path} not found: not an sccsdxl run directory",
                       "pass a directory under <output_dir>/runs/ made by 02_baseline")
    return BenchmarkRun(Path(run_dir), json.loads(path.read_text()))


def results_table(run: BenchmarkRun):
    """One row per mode: samples/s, validity, samples, wall time, where the logs are."""
    import pandas as pd

    rows = []
    for mode, result in run.record["results"].items():
        power = result.get("gpu_power") or {}
        rows.append({"mode": mode, "samples/s": result["samples_per_second"],
                     "result": {True: "VALID", False: "INVALID", None: "-"}[result["valid"]],
                     "samples": result["samples"], "wall s": result["wall_seconds"],
                     "GPU W": power.get("mean_power_w"), "J/sample": power.get("joules_per_sample"),
                     "logs": str(Path(result["log_dir"]).name)})
    return pd.DataFrame(rows).set_index("mode")


def accuracy_images(run: BenchmarkRun, limit: int) -> list[tuple[int, str, np.ndarray]]:
    """The first ``limit`` images of the run's accuracy log with their captions: (qsl_idx, caption, image)."""
    from .accuracy import iter_accuracy_log
    from .data import read_sample_set

    if "accuracy" not in run.record["results"] or limit <= 0:
        return []
    samples = read_sample_set(run.run_dir)
    log = Path(run.record["results"]["accuracy"]["log_dir"]) / "mlperf_log_accuracy.json"
    found = []
    for idx, image in iter_accuracy_log(log):
        found.append((idx, samples.caption(idx), image))
        if len(found) >= limit:
            break
    return sorted(found, key=lambda item: item[0])
