"""The MLPerf submission: the tree the official checker accepts, checked by the kit first, and the SCC artifacts.

What a team hands in (``mlperf-sdxl.md`` §8, §9):

  <output_dir>/submissions/<stamp>-<team>/      a new directory per build; nothing earlier is touched
    tree/<division>/<team>/...                  the MLPerf tree (layout of the chosen round, below)
    mlperf_submission.tar.gz                    the tree, packed
    mlperf_submission.run                       the exact papermill commands, in order, runnable
    mlperf_submission.md                        platform, throughput and how it was reached, accuracy, figures
    check.txt                                   every problem the kit's structural check found

Tree for v4.x/v5.x rounds (``v4`` layout; v4.1 = SCC24)::

  code/stable-diffusion-xl/                     README (how the results were produced) + the kit's source
  systems/<system>.json                         system description
  measurements/<system>/stable-diffusion-xl/Offline/  user.conf, mlperf.conf, README.md, <system>.json
  results/<system>/stable-diffusion-xl/Offline/performance/run_1/  loadgen summary + detail
  results/<system>/stable-diffusion-xl/Offline/accuracy/           logs, accuracy.txt, truncated log, images/
  compliance/<system>/stable-diffusion-xl/Offline/TEST01|TEST04/   when the audits were run

v6.x rounds: ``src/`` instead of ``code/``; user.conf, README.md, mlperf.conf and ``measurements.json`` sit in the
scenario directory of ``results/``, and so do TEST01/ and TEST04/.

The accuracy log (31.5 GB for 5000 images) is hashed in full into accuracy.txt and only the copy in the tree is
cut to its first and last 4 KiB; the run directory keeps the original.
"""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import tarfile
import unicodedata
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import constants as C
from .errors import KitError, OutputError, ParameterError
from .record import unique_dir
from .rounds import DEFAULT_ROUND, Round, compliance_ids, get_round, round_of_seeds

BENCHMARK = C.MODEL_NAME
SCENARIO = C.SCENARIO
DIVISIONS = ("open", "closed")
VALID_DIVISIONS = ("open", "closed", "network")
CATEGORIES = ("datacenter", "edge", "datacenter,edge", "edge,datacenter")
STATUSES = ("available", "preview", "rdi")
DEFAULT_BRANCH = "mlperf-inference-results-scc24"
NOT_SPECIFIED = "not specified"

SUBMISSIONS_DIR = "submissions"
TREE_DIR = "tree"
TARBALL = "mlperf_submission.tar.gz"
RUN_SCRIPT = "mlperf_submission.run"
REPORT_MD = "mlperf_submission.md"
CHECK_FILE = "check.txt"
FIGURES_DIR = "figures"

SUMMARY = "mlperf_log_summary.txt"
DETAIL = "mlperf_log_detail.txt"
ACCURACY_LOG = "mlperf_log_accuracy.json"
ACCURACY_TXT = "accuracy.txt"
PERF_FILES = (SUMMARY, DETAIL)
ACC_FILES = (SUMMARY, DETAIL, ACCURACY_TXT, ACCURACY_LOG)
OPTIONAL_FILES = ("mlperf_log_trace.json", "results.json", ".gitkeep")  # the checker ignores these anywhere
MEASURE_FILES = {"v4": ("mlperf.conf", "user.conf", "README.md"), "v6": ("user.conf", "README.md")}
IMPLEMENTATION_FIELDS = ("input_data_types", "retraining", "starting_weights_filename", "weight_data_types",
                         "weight_transformations")

# Checker limits (mlcommons/inference tools/submission; mlperf-sdxl.md §5, §6.5, §8).
MAX_ACCURACY_LOG_BYTES = 10 * 1024
VIEWABLE_BYTES = 4096  # the truncated log keeps this much of its start and of its end
FILE_LIMIT_BYTES = 50 * 1024 * 1024
CLOSED_MIN_SAMPLES_PER_QUERY = 5000
CLOSED_MIN_DURATION_MS = 600_000
CLOSED_PERFORMANCE_SAMPLE_COUNT = 5000
REQUIRED_SCENARIOS: dict[str, dict[str, set[str] | None]] = {
    "v4": {"datacenter": {"Server", "Offline"}, "edge": {"SingleStream", "Offline"},
           "datacenter,edge": {"SingleStream", "Offline", "Server"},
           "edge,datacenter": {"SingleStream", "Offline", "Server"}},
    "v6": {"datacenter": None, "edge": {"SingleStream", "Offline"},  # v6.x lists SDXL for edge only
           "datacenter,edge": {"SingleStream", "Offline", "Server"},
           "edge,datacenter": {"SingleStream", "Offline", "Server"}},
}
SCORE_PATTERNS = {  # accuracy.txt: v4.x wants one space and a bare number, later rounds also quoted numbers
    False: r".*'{key}':\s([\d.]+).*",
    True: r".*'{key}':\s+'?([\d.]+).*",
}
HASH_PATTERN = re.compile(r"^hash=([\w\d]+)$")
STARTING_WEIGHTS = {
    "hf": f"https://huggingface.co/{C.HF_MODEL_ID}",
    "mlcommons": "MLCommons SDXL 1.0 base checkpoint (https://github.com/mlcommons/inference/tree/master/"
                 "text_to_image#download-model)",
    "synthetic": "none: random weights (sccsdxl model_source synthetic), speed only, not a valid result",
    "tiny": "none: tiny random test model (sccsdxl model_source tiny), not a valid result",
}
GPU_MEMORY_KIND = (("H200", "HBM3e"), ("B200", "HBM3e"), ("MI325", "HBM3E"), ("MI300", "HBM3"), ("H100 SXM", "HBM3"),
                   ("H100 NVL", "HBM3"), ("A100", "HBM2e"), ("MI250", "HBM2e"), ("MI210", "HBM2e"),
                   ("L40", "GDDR6"), ("RTX 4090", "GDDR6X"), ("RTX 6000 Ada", "GDDR6"))
COMPARED_SETTINGS = ("variant", "model_source", "model_path", "dtype", "optimizations")


# --------------------------------------------------------------------------------------------------
# Findings and reports
# --------------------------------------------------------------------------------------------------

@dataclass
class Finding:
    """One thing to fix (error: the MLPerf checker rejects it) or to look at (warning)."""

    severity: str  # "error" | "warning"
    where: str
    problem: str
    fix: str = ""


@dataclass
class CheckReport:
    """All findings of one check, listed at once."""

    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def error(self, where: str, problem: str, fix: str = "") -> None:
        self.findings.append(Finding("error", where, problem, fix))

    def warn(self, where: str, problem: str, fix: str = "") -> None:
        self.findings.append(Finding("warning", where, problem, fix))

    def merged(self, other: "CheckReport") -> "CheckReport":
        return CheckReport(self.findings + other.findings)

    def table(self):
        """Errors first, then warnings: where, what, how to fix it."""
        import pandas as pd

        rows = [asdict(f) for f in sorted(self.findings, key=lambda f: f.severity != "error")]
        return pd.DataFrame(rows, columns=["severity", "where", "problem", "fix"])

    def text(self) -> str:
        head = f"{len(self.errors)} error(s), {len(self.warnings)} warning(s)"
        lines = [f"{f.severity.upper()}: {f.where}: {f.problem}" + (f"\n    fix: {f.fix}" if f.fix else "")
                 for f in sorted(self.findings, key=lambda f: f.severity != "error")]
        return "\n".join([head, *lines]) + "\n"


# --------------------------------------------------------------------------------------------------
# Parameters: team and system names are untrusted input
# --------------------------------------------------------------------------------------------------

def clean_name(text: str, what: str, parameter: str) -> tuple[str, str | None]:
    """A directory-safe name (ASCII letters, digits, '_', '.', '-'; no leading dot) and a note if it changed."""
    if not isinstance(text, str):
        raise ParameterError(f"{what} must be text, got {text!r}", f"pass e.g. -p {parameter} MyTeam")
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "_", ascii_text.strip())
    cleaned = re.sub(r"\.{2,}", ".", re.sub(r"_{2,}", "_", cleaned)).strip("._-")[:64].strip("._-")
    if not cleaned:
        raise ParameterError(f"{what} {text!r} has no letters or digits a directory can be named after",
                             f"pass e.g. -p {parameter} MyTeam (ASCII letters, digits, '_', '.', '-')")
    note = None if cleaned == text else (f"{what} {text!r} is written as {cleaned!r}: MLPerf directory names "
                                         "allow only ASCII letters, digits, '_', '.' and '-'")
    return cleaned, note


@dataclass
class SubmissionOptions:
    """The notebook's choices: who submits, in which division and category, for which round."""

    submitter: str
    division: str = "open"
    category: str = "datacenter"
    system_name: str = ""
    mlperf_round: str = DEFAULT_ROUND
    system_overrides: dict = field(default_factory=dict)
    system_label: str = ""  # the system name as the team wrote it (JSON system_name); filled by validate()
    notes: list[str] = field(default_factory=list)
    validated: bool = False

    def validate(self) -> "SubmissionOptions":
        """A checked copy with safe names; stops on any bad value before anything is written."""
        if not str(self.submitter).strip():
            raise ParameterError("no team name given", "pass your team name: -p submitter MyTeam")
        team, team_note = clean_name(self.submitter, "team name", "submitter")
        checks = [(self.division in DIVISIONS, f"unknown division {self.division!r}",
                   "use open (SCC default: any accuracy, short runs) or closed (full rules)"),
                  (self.category in CATEGORIES, f"unknown category {self.category!r}",
                   f"use one of {', '.join(CATEGORIES)} (SCC: datacenter)"),
                  (isinstance(self.system_overrides, dict), "system_overrides must be a mapping of field: value",
                   "pass e.g. -y 'system_overrides: {cooling: liquid}'")]
        for ok, problem, fix in checks:
            if not ok:
                raise ParameterError(problem, fix)
        rnd = get_round(self.mlperf_round)
        _check_overrides(self.system_overrides)
        label = str(self.system_name).strip()
        system, system_note = clean_name(label, "system name", "system_name") if label else ("", None)
        notes = [n for n in (team_note, system_note) if n]
        return replace(self, submitter=team, system_name=system, system_label=label, mlperf_round=rnd.name,
                       notes=notes, validated=True)


def _check_overrides(overrides: dict) -> None:
    from .system import SYSTEM_DESC_REQUIRED_FIELDS

    owned = {"division": "division", "submitter": "submitter", "system_type": "category"}
    for key, value in overrides.items():
        if key in owned:
            raise ParameterError(f"system_overrides sets {key!r}, which comes from the notebook parameters",
                                 f"use -p {owned[key]} ... instead")
        if key not in SYSTEM_DESC_REQUIRED_FIELDS and key not in IMPLEMENTATION_FIELDS:
            raise ParameterError(f"system_overrides has unknown field {key!r}",
                                 "use the MLPerf system-description fields "
                                 "(sccsdxl.system.SYSTEM_DESC_REQUIRED_FIELDS) "
                                 f"or the implementation fields {', '.join(IMPLEMENTATION_FIELDS)}")
        if key == "status" and value not in STATUSES:
            raise ParameterError(f"status {value!r} is not allowed", f"use one of {', '.join(STATUSES)}")


# --------------------------------------------------------------------------------------------------
# Finding the results: runs, records, accuracy output, compliance audits
# --------------------------------------------------------------------------------------------------

@dataclass
class Missing:
    """A result the submission needs, and the notebook that makes it."""

    what: str
    notebook: str
    fix: str


class MissingResultsError(KitError):
    """The runs the submission is built from are not all there; lists every missing piece at once."""

    def __init__(self, missing: list[Missing]):
        self.missing = missing
        lines = "\n".join(f"  - {m.what} (made by notebooks/{m.notebook}.ipynb)" for m in missing)
        super().__init__(f"the submission needs results that are missing:\n{lines}",
                         " | ".join(dict.fromkeys(m.fix for m in missing)))

    def table(self):
        import pandas as pd

        return pd.DataFrame([asdict(m) for m in self.missing])


@dataclass
class Inputs:
    """Everything a submission is built from."""

    output_dir: Path
    perf_run: Any  # harness.BenchmarkRun
    accuracy_run: Any
    accuracy_txt: Path
    images_dir: Path | None
    compliance: dict[str, Any] = field(default_factory=dict)  # test -> compliance.ComplianceResult
    records: dict[str, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def accuracy_log(self) -> Path:
        return Path(self.accuracy_run.run_dir) / "accuracy" / ACCURACY_LOG

    @property
    def performance_dir(self) -> Path:
        return Path(self.perf_run.run_dir) / "performance"

    def table(self):
        """Where each part of the submission comes from."""
        import pandas as pd

        perf = self.perf_run.result("performance") or {}
        rows = [("performance", Path(self.perf_run.run_dir).name, f"{perf.get('samples_per_second')} samples/s, "
                 f"{'VALID' if perf.get('valid') else 'INVALID'}"),
                ("accuracy log", Path(self.accuracy_run.run_dir).name, str(self.accuracy_log.name)),
                ("accuracy result", Path(self.accuracy_run.run_dir).name, self.accuracy_txt.name),
                ("compliance images", Path(self.accuracy_run.run_dir).name,
                 self.images_dir.name if self.images_dir else "none")]
        rows += [(f"compliance {test}", Path(r.directory).name, "PASS" if r.passed else "FAIL")
                 for test, r in sorted(self.compliance.items())]
        return pd.DataFrame(rows, columns=["part", "run", "what"])


NOTEBOOK_RECORDS = ("01_setup", "02_baseline", "03_batch_size_sweep", "04_quantization", "05_accuracy")


def read_records(output_dir: str | Path) -> dict[str, dict]:
    """The notebook records ``<output_dir>/0N_*.json`` present (unreadable ones are skipped)."""
    found = {}
    for path in sorted(Path(output_dir).expanduser().glob("0[0-9]_*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict):
            found[path.stem] = record
    return found


def _resolve_run_dir(value: str, output_dir: Path) -> Path:
    """A recorded run directory: as written, else the same name under <output_dir>/runs/ (cwd may differ)."""
    path = Path(value).expanduser()
    if (path / "run.json").is_file():
        return path
    moved = output_dir / "runs" / path.name
    return moved if (moved / "run.json").is_file() else path


def accuracy_results(accuracy_dir: Path) -> list[Path]:
    """accuracy*.txt written by 05_accuracy in a run's accuracy/ folder: real scores first, newest first."""
    from .accuracy import STANDIN_TAG

    found = [p for p in accuracy_dir.glob("accuracy*.txt") if p.is_file()]
    return sorted(found, key=lambda p: (STANDIN_TAG in p.name, -p.stat().st_mtime))


def images_for(accuracy_txt: Path) -> Path | None:
    """The compliance-image folder written together with this accuracy.txt (accuracy-2.txt -> images-2/)."""
    suffix = accuracy_txt.stem[len("accuracy"):]
    images = accuracy_txt.parent / f"images{suffix}"
    return images if images.is_dir() else None


def _settings(run) -> dict[str, Any]:
    config = run.record.get("config", {})
    return {**{k: config.get(k, "") for k in COMPARED_SETTINGS}, "round": run.record.get("round"),
            "samples": run.record.get("samples")}


def find_inputs(output_dir: str | Path, run_dir: str = "") -> Inputs:
    """The performance run (``run_dir``, or the run of 02_baseline.json), its accuracy result and audits.

    Stops with MissingResultsError listing every missing piece and the notebook that produces it.
    """
    from .compliance import latest_results
    from .harness import load_run

    out = Path(output_dir).expanduser()
    records = read_records(out)
    if run_dir:
        path = Path(run_dir).expanduser()
        if not (path / "run.json").is_file():
            raise MissingResultsError([Missing(f"run directory {path} (it holds no run.json)", "02_baseline",
                                               "pass run_dir of a directory under <output_dir>/runs/, or run_dir '' "
                                               "for the run recorded in 02_baseline.json")])
    elif records.get("02_baseline", {}).get("run_dir"):
        path = _resolve_run_dir(records["02_baseline"]["run_dir"], out)
    else:
        raise MissingResultsError([
            Missing(f"a benchmark run ({out / '02_baseline.json'} not found)", "02_baseline",
                    f"run notebooks/02_baseline.ipynb with -p output_dir {out}, or pass -p run_dir <run directory>"),
            Missing("an accuracy result (accuracy.txt with CLIP and FID)", "05_accuracy",
                    "then run notebooks/05_accuracy.ipynb with -p run_dir <that run>")])
    perf_run = load_run(path)
    missing: list[Missing] = []
    if not (Path(perf_run.run_dir) / "performance" / DETAIL).is_file():
        missing.append(Missing(f"a performance run in {perf_run.run_dir}", "02_baseline",
                               "run notebooks/02_baseline.ipynb (performance and accuracy modes), "
                               "or pass another run_dir"))
    accuracy, notes = _locate_accuracy(perf_run, records, out, missing)
    if missing:
        raise MissingResultsError(missing)
    accuracy_run, accuracy_txt = accuracy
    return Inputs(out, perf_run, accuracy_run, accuracy_txt, images_for(accuracy_txt),
                  latest_results(perf_run.run_dir), records, notes)


def _locate_accuracy(perf_run, records: dict, out: Path, missing: list[Missing]):
    """(run, accuracy.txt) from the performance run itself, else from 05_accuracy's run of the same configuration."""
    from .harness import load_run

    notes: list[str] = []
    candidates = [perf_run]
    scored = records.get("05_accuracy", {}).get("run_dir")
    if scored:
        other = _resolve_run_dir(scored, out)
        if (other / "run.json").is_file() and other.resolve() != Path(perf_run.run_dir).resolve():
            candidates.append(load_run(other))
    for run in candidates:
        results = accuracy_results(Path(run.run_dir) / "accuracy")
        if not results or not (Path(run.run_dir) / "accuracy" / ACCURACY_LOG).is_file():
            continue
        if run is not perf_run:
            differ = {k: (v, _settings(run)[k]) for k, v in _settings(perf_run).items() if _settings(run)[k] != v}
            if differ:
                notes.append(f"05_accuracy scored {Path(run.run_dir).name}, which differs from the performance run in "
                             + ", ".join(f"{k} ({a!r} vs {b!r})" for k, (a, b) in differ.items()))
                continue
            notes.append(f"accuracy from run {Path(run.run_dir).name} (05_accuracy), performance from run "
                         f"{Path(perf_run.run_dir).name}: same configuration")
        return (run, results[0]), notes
    name = Path(perf_run.run_dir).name
    has_log = (Path(perf_run.run_dir) / "accuracy" / ACCURACY_LOG).is_file()
    new_run = ("run notebooks/05_accuracy.ipynb with -p run_dir '' and the run's configuration (variant, "
               "model_source, dtype, ...): it makes and scores a new accuracy run")
    if not has_log and len(candidates) == 1:
        missing.append(Missing(f"an accuracy-mode run (accuracy/{ACCURACY_LOG}) for run {name}", "05_accuracy",
                               new_run))
    fix = f"run notebooks/05_accuracy.ipynb with -p run_dir {perf_run.run_dir}" if has_log else new_run
    missing.append(Missing(f"an accuracy result (accuracy.txt with CLIP, FID and the log's hash) for run {name}"
                           + (f"; {notes[-1]}" if notes else ""), "05_accuracy", fix))
    return None, notes


# --------------------------------------------------------------------------------------------------
# The system description and the implementation JSON
# --------------------------------------------------------------------------------------------------

def _gpu_memory_kind(name: str) -> str:
    return next((kind for key, kind in GPU_MEMORY_KIND if key.lower() in name.lower()), "")


def _machine_report(run, output_dir: Path) -> dict[str, Any]:
    """The run's recorded machine, completed with what run.json does not hold (topology, disk, network)."""
    from . import system as S

    return {**(run.record.get("machine") or {}),
            "cpu": {**S.cpu_topology(), "frequency_mhz": S.cpu_frequency_mhz(), "caches": S.cpu_caches()},
            "disk": S.disk_info(output_dir), "network": S.network_interfaces(), "distribution": S.operating_system()}


def system_json(run, options: SubmissionOptions, output_dir: Path) -> tuple[dict[str, Any], list[str], list[str]]:
    """``systems/<system>.json`` from detection; returns (fields, fields left 'not specified', fields guessed)."""
    from . import system as S

    report = _machine_report(run, output_dir)
    desc = S.system_description(report)
    desc.update(division=options.division, submitter=options.submitter, system_type=options.category)
    nodes = (run.record.get("distributed") or {}).get("nodes") or []
    if len(nodes) > 1:  # a multi-node run of sccsdxl.distributed
        desc["number_of_nodes"] = len(nodes)
    if options.system_label:
        desc["system_name"] = options.system_label
    gpus = report.get("gpus") or []
    defaults = _system_defaults(desc, report, len(gpus))
    guessed = []
    if not desc.get("accelerator_memory_configuration") and gpus and _gpu_memory_kind(gpus[0].get("name", "")):
        desc["accelerator_memory_configuration"] = _gpu_memory_kind(gpus[0]["name"])
        guessed.append("accelerator_memory_configuration")
    for key, value in defaults.items():
        if desc.get(key) in ("", None):
            desc[key] = value
    desc.update({k: v for k, v in options.system_overrides.items() if k not in IMPLEMENTATION_FIELDS})
    for key in ("number_of_nodes", "host_processors_per_node", "host_processor_core_count", "accelerators_per_node",
                "host_network_card_count"):
        if desc.get(key) == 0:  # the checker reads 0 as an empty answer
            desc[key] = "0"
    unspecified = [k for k, v in desc.items() if v == NOT_SPECIFIED]
    guessed = [k for k in guessed if k not in options.system_overrides]
    return desc, unspecified, guessed


def _system_defaults(desc: dict, report: dict, n_gpus: int) -> dict[str, Any]:
    """Values implied by the machine where detection has none; NOT_SPECIFIED where only the team knows."""
    sockets = (report.get("cpu") or {}).get("sockets", 1)
    memory_gb = report.get("memory_bytes", 0) / 1024 ** 3
    no_gpu = "N/A (no accelerator)"
    return {
        "host_processor_interconnect": "N/A (one socket)" if sockets == 1 else NOT_SPECIFIED,
        "host_processor_frequency": NOT_SPECIFIED, "host_processor_caches": NOT_SPECIFIED,
        "host_memory_configuration": (f"{memory_gb:.0f} GB total; modules {NOT_SPECIFIED}" if memory_gb
                                      else NOT_SPECIFIED),
        "host_storage_capacity": NOT_SPECIFIED, "host_storage_type": NOT_SPECIFIED,
        "host_networking": "N/A (no physical network port detected)",
        "host_networking_topology": ("N/A (single node)" if str(desc.get("number_of_nodes", 1)) == "1"
                                     else NOT_SPECIFIED),
        "accelerator_model_name": no_gpu, "accelerator_memory_capacity": no_gpu,
        "accelerator_memory_configuration": no_gpu if not n_gpus else NOT_SPECIFIED,
        "accelerator_frequency": no_gpu if not n_gpus else NOT_SPECIFIED,
        "accelerator_host_interconnect": no_gpu if not n_gpus else NOT_SPECIFIED,
        "accelerator_interconnect": ("N/A (one accelerator)" if n_gpus == 1 else
                                     no_gpu if not n_gpus else NOT_SPECIFIED),
        "accelerator_interconnect_topology": "N/A" if n_gpus <= 1 else NOT_SPECIFIED,
        "accelerator_on-chip_memories": no_gpu if not n_gpus else NOT_SPECIFIED,
        "cooling": NOT_SPECIFIED, "system_type_detail": "N/A", "hw_notes": "N/A",
        "framework": NOT_SPECIFIED, "operating_system": NOT_SPECIFIED, "other_software_stack": NOT_SPECIFIED,
        "host_processor_model_name": NOT_SPECIFIED,
    }


def _quantization(config: dict) -> list[str]:
    """Quantized weight types of the run: sccsdxl.quant options (fp8/int8) and a future ``quant`` section."""
    found = [o for o in ("fp8", "int8") if o in {s.strip() for s in str(config.get("optimizations", "")).split(",")}]
    quant = config.get("quant")
    if isinstance(quant, str) and quant.strip() not in ("", "none"):
        found.append(quant.strip())
    elif isinstance(quant, dict):
        found += [str(quant[k]) for k in ("weight_data_types", "weights", "weight_dtype", "dtype") if quant.get(k)]
    return list(dict.fromkeys(t.strip() for entry in found for t in entry.split(",") if t.strip()))


def implementation_json(config: dict, overrides: dict | None = None) -> dict[str, str]:
    """The measurements JSON: data types from the run's dtype and quantization, starting weights, transformations."""
    dtype = config.get("dtype", "fp32")
    source = config.get("model_source", "hf")
    quant = _quantization(config)
    transformations = []
    if quant:
        transformations.append(f"quantization to {', '.join(quant)} (dynamic, UNet linear layers; sccsdxl.quant)")
    if dtype == "bf16":
        transformations.append("weights cast to bf16")
    if "fuse_qkv" in str(config.get("optimizations", "")):
        transformations.append("attention q/k/v projections fused into one matmul (same values)")
    weights = STARTING_WEIGHTS.get(source, source)
    if source == "mlcommons" and config.get("model_path"):
        weights += f", {Path(config['model_path']).name}"
    fields = {"input_data_types": dtype, "retraining": "No", "starting_weights_filename": weights,
              "weight_data_types": ",".join(dict.fromkeys([*quant, dtype])),
              "weight_transformations": "; ".join(transformations) or "No"}
    fields.update({k: str(v) for k, v in (overrides or {}).items() if k in IMPLEMENTATION_FIELDS})
    return fields


def mlperf_conf_text(rnd: Round) -> str:
    """The loadgen settings in effect: SDXL lines of loadgen's built-in mlperf.conf plus the round's seeds."""
    m = C.MODEL_NAME
    return "\n".join([
        f"# loadgen settings in effect for these results: the {m} Offline lines of loadgen's built-in",
        f"# mlperf.conf and the seeds of MLPerf Inference {rnd.name} (set by sccsdxl on TestSettings).",
        "# user.conf beside this file was applied after them.",
        *(f"*.*.{name} = {value}" for name, value in rnd.seeds.items()),
        f"{m}.*.performance_sample_count_override = {CLOSED_PERFORMANCE_SAMPLE_COUNT}",
        "*.Offline.target_latency_percentile = 90",
        f"*.Offline.min_duration = {CLOSED_MIN_DURATION_MS}",
        "*.Offline.target_qps = 1.0",
        f"{m}.Offline.min_query_count = {CLOSED_MIN_SAMPLES_PER_QUERY}",
    ]) + "\n"


# --------------------------------------------------------------------------------------------------
# The commands that produced the results (mlperf_submission.run, README files)
# --------------------------------------------------------------------------------------------------

@dataclass
class Command:
    """One papermill call: notebook, its parameters, when it ran, what it contributed."""

    notebook: str
    parameters: dict[str, Any]
    when: str
    note: str


def record_parameters(notebook: str, source: dict[str, Any]) -> dict[str, Any]:
    """The notebook's own parameters out of a record's parameters/config (presentation-only ones dropped)."""
    from .params import NOTEBOOK_PARAMETERS, PARAMETER_TYPES

    allowed = NOTEBOOK_PARAMETERS.get(notebook, list(PARAMETER_TYPES))
    return {k: _redact(source[k]) if isinstance(source[k], str) else source[k]
            for k in allowed if k in source and k != "interactive"}


def _notes_for(notebook: str, record: dict, perf_dir: Path, acc_dir: Path, out: Path) -> str:
    run = record.get("run_dir")
    same = run and _resolve_run_dir(run, out).resolve()
    if notebook == "02_baseline":
        return ("produced the submitted performance result" if same == perf_dir
                else "baseline run") + (" and accuracy log" if same == acc_dir else "")
    if notebook == "05_accuracy":
        return "scored accuracy.txt (CLIP, FID)" if same == acc_dir else "accuracy check of another run"
    return {"01_setup": "machine check and downloads", "03_batch_size_sweep": "batch-size / GPU-count sweep",
            "04_quantization": "speed options checked against the reference images"}.get(notebook, "")


def reconstruct_commands(inputs: Inputs, params06: dict[str, Any] | None = None) -> list[Command]:
    """The papermill calls behind the results, in the order they ran (records' times), then 06 itself."""
    out = inputs.output_dir
    perf_dir, acc_dir = Path(inputs.perf_run.run_dir).resolve(), Path(inputs.accuracy_run.run_dir).resolve()
    commands, covered = [], set()
    for notebook, record in inputs.records.items():
        if notebook not in NOTEBOOK_RECORDS:
            continue
        source = {**(record.get("config") or {}), **(record.get("parameters") or {})}
        commands.append(Command(notebook, record_parameters(notebook, source), str(record.get("written", "")),
                                _notes_for(notebook, record, perf_dir, acc_dir, out)))
        if record.get("run_dir"):
            covered.add(_resolve_run_dir(record["run_dir"], out).resolve())
    for run, what in ((inputs.perf_run, "the submitted performance result"), (inputs.accuracy_run, "the accuracy log")):
        resolved = Path(run.run_dir).resolve()
        if resolved not in covered:
            covered.add(resolved)
            commands.append(Command("02_baseline", record_parameters("02_baseline", run.record.get("config", {})),
                                    str(run.record.get("created", "")), f"reproduces run {resolved.name}: {what}"))
    commands.sort(key=lambda c: c.when)
    if params06 is not None:
        commands.append(Command("06_submission", record_parameters("06_submission", params06),
                                datetime.now(timezone.utc).isoformat(timespec="seconds"), "this submission"))
    return commands


@functools.lru_cache(maxsize=1)
def kit_version() -> dict[str, str]:
    """sccsdxl's version and, for a git checkout, its commit (with '+local changes' when dirty)."""
    from importlib import metadata

    try:
        version = metadata.version("sccsdxl")
    except metadata.PackageNotFoundError:
        version = "unknown"
    repo = Path(__file__).resolve().parents[1]
    commit = _git_quiet(["rev-parse", "HEAD"], repo)
    dirty = bool(_git_quiet(["status", "--porcelain", "--untracked-files=no"], repo)) if commit else False
    shown = (commit + (" +local changes" if dirty else "")) if commit else "not a git checkout"
    return {"version": version, "commit": shown}


def _git_quiet(args: list[str], cwd: Path) -> str:
    if shutil.which("git") is None or not (cwd / ".git").exists():
        return ""
    try:
        done = subprocess.run(["git", "--no-optional-locks", "-C", str(cwd), *args], capture_output=True, text=True,
                              timeout=10, env=_git_env(), check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


PARAMS_EOF = "SCCSDXL_PARAMETERS"


def run_script(commands: list[Command], header: list[str]) -> str:
    """mlperf_submission.run: each notebook's parameter file written out, then its papermill line, in order."""
    import yaml

    lines = ["#!/usr/bin/env bash", "# mlperf_submission.run: the commands that produced this submission, in the order "
             "they ran.", *(f"# {h}" for h in header),
             "# Run it from a checkout of the sccsdxl kit (same commit), installed with: pip install -e .",
             "set -euo pipefail", 'cd "${SCCSDXL_DIR:-.}"', "mkdir -p mlperf_params", ""]
    for n, command in enumerate(commands, 1):
        stem = f"mlperf_params/{n:02d}-{command.notebook}"
        text = yaml.safe_dump(command.parameters, sort_keys=False, default_flow_style=False,
                              allow_unicode=True).rstrip("\n")
        lines += [f"# {n}. {command.notebook} ({command.when or 'time not recorded'}): {command.note}",
                  f"cat > {stem}.yaml <<'{PARAMS_EOF}'", text if command.parameters else "{}", PARAMS_EOF,
                  f"papermill notebooks/{command.notebook}.ipynb {stem}.out.ipynb -f {stem}.yaml", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Building the tree
# --------------------------------------------------------------------------------------------------

@dataclass
class Submission:
    """One built submission: where everything is and what the builder noticed."""

    directory: Path
    tree: Path
    root: Path  # tree/<division>/<team>
    options: SubmissionOptions
    round: str
    layout: str
    system_id: str
    system: dict[str, Any]
    implementation: dict[str, str]
    commands: list[Command]
    build: CheckReport
    files: dict[str, str] = field(default_factory=dict)

    @property
    def scenario_dir(self) -> Path:
        return self.root / "results" / self.system_id / BENCHMARK / SCENARIO


def layout_paths(layout: str, root: Path, system: str) -> dict[str, Path]:
    """Where each part goes in the round's layout (v4: code/, measurements/, compliance/; v6: src/, all in results/)."""
    scenario = root / "results" / system / BENCHMARK / SCENARIO
    if layout == "v6":
        return {"code": root / "src" / BENCHMARK, "measurements": scenario, "compliance": scenario,
                "scenario": scenario, "implementation": scenario / "measurements.json"}
    measurements = root / "measurements" / system / BENCHMARK / SCENARIO
    return {"code": root / "code" / BENCHMARK, "measurements": measurements,
            "compliance": root / "compliance" / system / BENCHMARK / SCENARIO, "scenario": scenario,
            "implementation": measurements / f"{system}.json"}


def new_submission_dir(output_dir: Path, team: str) -> Path:
    """A fresh ``<output_dir>/submissions/<stamp>-<team>[-n]``; an earlier submission is never reused."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return unique_dir(Path(output_dir).expanduser() / SUBMISSIONS_DIR, f"{stamp}-{team}", "a submission directory",
                      first_suffix=0)


def _inside(path: Path, base: Path) -> Path:
    """``path`` itself, after making sure it cannot point outside ``base``."""
    if not path.resolve().is_relative_to(base.resolve()):
        raise OutputError(f"refusing to write {path}: it is outside {base}", "use plain names for team and system")
    return path


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


def default_system_id(run) -> str:
    """e.g. '1xNVIDIA_H200' (GPUs) or 'cpu_only', from the run's machine."""
    gpus = (run.record.get("machine") or {}).get("gpus") or []
    if not gpus:
        return "cpu_only"
    return clean_name(f"{len(gpus)}x{gpus[0].get('name', 'GPU')}", "system name", "system_name")[0]


def truncated_copy(src: Path, dst: Path) -> tuple[str, bool]:
    """Hash the FULL accuracy log, then write the tree's copy cut to its first and last 4 KiB (if over 10 KiB)."""
    from .data import sha256_of

    digest = sha256_of(src)
    size = src.stat().st_size
    dst.parent.mkdir(parents=True, exist_ok=True)
    if size <= MAX_ACCURACY_LOG_BYTES:
        shutil.copyfile(src, dst)
        return digest, False
    with open(src, "rb") as fh:
        head = fh.read(VIEWABLE_BYTES)
        fh.seek(size - VIEWABLE_BYTES)
        tail = fh.read(VIEWABLE_BYTES)
    dst.write_bytes(head + b"\n\n...\n\n" + tail)
    return digest, True


def accuracy_txt_with_hash(text: str, digest: str) -> tuple[str, str | None]:
    """accuracy.txt with a hash line of the full log (appended when missing); returns (text, hash found before)."""
    found = next((m.group(1) for line in text.splitlines() if (m := HASH_PATTERN.match(line.strip()))), None)
    if found is None:
        text = text.rstrip("\n") + f"\nhash={digest}\n"
    return text, found


def build_submission(inputs: Inputs, options: SubmissionOptions, params06: dict[str, Any] | None = None) -> Submission:
    """Write the tree for the round's layout into a new submission directory; the run directories are only read."""
    options = options if options.validated else options.validate()
    rnd = get_round(options.mlperf_round)
    system = options.system_name or default_system_id(inputs.perf_run)
    directory = new_submission_dir(inputs.output_dir, options.submitter)
    tree = directory / TREE_DIR
    root = _inside(tree / options.division / options.submitter, directory)
    paths = {k: _inside(v, root) for k, v in layout_paths(rnd.layout, root, system).items()}
    build = CheckReport()
    desc, unspecified, guessed = system_json(inputs.perf_run, options, inputs.output_dir)
    impl = implementation_json(inputs.perf_run.record.get("config", {}), options.system_overrides)
    commands = reconstruct_commands(inputs, params06)
    sub = Submission(directory, tree, root, options, rnd.name, rnd.layout, system, desc, impl, commands, build)
    _write(root / "systems" / f"{system}.json", json.dumps(desc, indent=2) + "\n")
    _write_measurements(sub, inputs, paths, rnd)
    _write_code(sub, inputs, paths["code"])
    _copy_results(sub, inputs, paths["scenario"])
    _copy_compliance(sub, inputs, paths["compliance"])
    _build_findings(sub, inputs, unspecified, guessed)
    sub.files["run_script"] = str(_write(directory / RUN_SCRIPT, run_script(commands, _header(sub))))
    os.chmod(sub.files["run_script"], 0o755)
    return sub


def _header(sub: Submission) -> list[str]:
    kit = kit_version()
    return [f"team {sub.options.submitter}, MLPerf Inference {sub.round}, division {sub.options.division}, "
            f"category {sub.options.category}, system {sub.system_id}",
            f"kit: sccsdxl {kit['version']}, commit {kit['commit']}"]


def _write_measurements(sub: Submission, inputs: Inputs, paths: dict[str, Path], rnd: Round) -> None:
    where = paths["measurements"]
    _copy(Path(inputs.perf_run.run_dir) / "user.conf", where / "user.conf")
    _write(where / "mlperf.conf", mlperf_conf_text(rnd))
    _write(paths["implementation"], json.dumps(sub.implementation, indent=2) + "\n")
    _write(where / "README.md", _measurements_readme(sub, inputs))


def _config_rows(config: dict, perf: dict) -> list[tuple[str, Any]]:
    return [("model source", config.get("model_source")), ("dtype", config.get("dtype")),
            ("batch size", config.get("batch_size")), ("optimizations", config.get("optimizations") or "none"),
            ("variant (samples)", config.get("variant")), ("device", config.get("device")),
            ("target_qps", config.get("target_qps")), ("samples/s", perf.get("samples_per_second"))]


def _measurements_readme(sub: Submission, inputs: Inputs) -> str:
    config = inputs.perf_run.record.get("config", {})
    perf = inputs.perf_run.result("performance") or {}
    rows = "\n".join(f"| {k} | {v} |" for k, v in _config_rows(config, perf))
    runs = [f"- performance: run `{Path(inputs.perf_run.run_dir).name}`",
            f"- accuracy: run `{Path(inputs.accuracy_run.run_dir).name}`, `{inputs.accuracy_txt.name}`"]
    runs += [f"- {test}: `{Path(r.directory).name}` ({'PASS' if r.passed else 'FAIL'})"
             for test, r in sorted(inputs.compliance.items())]
    script = run_script(sub.commands, _header(sub))
    return (f"# {BENCHMARK} {SCENARIO}: how these results were measured\n\n"
            f"Team {sub.options.submitter}, system `{sub.system_id}`, MLPerf Inference {sub.round}, "
            f"{sub.options.division} division, {sub.options.category}.\n\n"
            "Measured with the sccsdxl kit: the MLCommons reference SDXL pipeline (SDXL 1.0 base, Euler, 20 steps, "
            "guidance 8, the fixed latent) behind an MLPerf LoadGen Offline SUT, driven by papermill notebooks.\n\n"
            f"| setting | value |\n|---|---|\n{rows}\n\n## Runs\n\n" + "\n".join(runs) +
            "\n\n## Exact commands\n\nRun from a checkout of the kit (`pip install -e .`); the same script is "
            f"`{RUN_SCRIPT}`.\n\n```bash\n{script}```\n")


def _write_code(sub: Submission, inputs: Inputs, code_dir: Path) -> None:
    kit = kit_version()
    config = inputs.perf_run.record.get("config", {})
    text = (f"# sccsdxl: the code behind these {BENCHMARK} results\n\n"
            f"Kit version {kit['version']}, commit {kit['commit']}. `sccsdxl-kit/` holds its Python package and "
            "notebooks as they were when this submission was built.\n\n"
            "How the results were produced:\n\n"
            "1. `02_baseline` runs MLPerf LoadGen (Offline) against an SUT that batches the query through the "
            "MLCommons reference SDXL pipeline (diffusers `StableDiffusionXLPipeline`, SDXL 1.0 base, "
            "EulerDiscreteScheduler, 20 steps, guidance 8, the reference negative prompt and fixed latent), "
            "in performance mode and in accuracy mode.\n"
            "2. `05_accuracy` computes CLIP and FID from the accuracy log as `text_to_image/tools/accuracy_coco.py` "
            "does and writes accuracy.txt with the hash of the full log.\n"
            "3. `06_submission` builds this tree, runs the compliance tests when asked, and checks it.\n\n"
            f"Configuration: model source {config.get('model_source')}, dtype {config.get('dtype')}, batch size "
            f"{config.get('batch_size')}, optimizations {config.get('optimizations') or 'none'}.\n\n"
            f"The exact commands are in `{RUN_SCRIPT}` and in the measurements README.\n")
    _write(code_dir / "README.md", text)
    _copy_kit_source(code_dir / "sccsdxl-kit")


def _copy_kit_source(dst: Path) -> None:
    """The kit's package, notebooks and project file (no caches, no hidden files)."""
    package = Path(__file__).resolve().parent
    repo = package.parent
    wanted = sorted(package.rglob("*.py")) + sorted((package / "assets").glob("*"))
    if (repo / "pyproject.toml").is_file():
        wanted += [repo / "pyproject.toml", repo / "README.md", *sorted((repo / "notebooks").glob("*.ipynb"))]
    for src in wanted:
        rel = src.relative_to(repo)
        if not src.is_file() or any(part.startswith(".") or part == "__pycache__" or " " in part for part in rel.parts):
            continue
        _copy(src, dst / rel)


def _copy_results(sub: Submission, inputs: Inputs, scenario: Path) -> None:
    """performance/run_1 and accuracy/ (logs, accuracy.txt with the full log's hash, truncated log, images)."""
    for name in PERF_FILES:
        _copy(inputs.performance_dir / name, scenario / "performance" / "run_1" / name)
    acc_src = Path(inputs.accuracy_run.run_dir) / "accuracy"
    acc_dst = scenario / "accuracy"
    for name in PERF_FILES:
        _copy(acc_src / name, acc_dst / name)
    digest, truncated = truncated_copy(inputs.accuracy_log, acc_dst / ACCURACY_LOG)
    text, recorded = accuracy_txt_with_hash(inputs.accuracy_txt.read_text(), digest)
    _write(acc_dst / ACCURACY_TXT, text)
    sub.files.update(accuracy_sha256=digest, accuracy_log_truncated=str(truncated))
    if recorded is not None and recorded != digest:
        sub.build.error(f"{inputs.accuracy_txt}", "its hash line is not the sha256 of the accuracy log beside it: the "
                        "scores were computed from another log", "re-run notebooks/05_accuracy.ipynb with -p run_dir "
                        f"{inputs.accuracy_run.run_dir}")
    if inputs.images_dir is not None:
        pngs = [p for p in sorted(inputs.images_dir.glob("*.png")) if p.stem.isdigit()]
        for path in pngs + ([inputs.images_dir / "captions.txt"] if pngs else []):
            if path.is_file():
                _copy(path, acc_dst / "images" / path.name)


def _copy_compliance(sub: Submission, inputs: Inputs, where: Path) -> None:
    """TEST01 / TEST04 as the checker wants them: verify files, performance/run_1, TEST01's accuracy/."""
    from .compliance import (ACCURACY_LOG as TEST_LOG, BASELINE_ACCURACY, COMPLIANCE_ACCURACY, LOGS_DIR,
                             VERIFY_ACCURACY, VERIFY_PERFORMANCE)

    for test, result in sorted(inputs.compliance.items()):
        src, dst = Path(result.directory), where / test
        for name in (VERIFY_PERFORMANCE, VERIFY_ACCURACY):
            if (src / name).is_file():
                _copy(src / name, dst / name)
        for name in PERF_FILES:
            _copy(src / LOGS_DIR / name, dst / "performance" / "run_1" / name)
        if test != "TEST01":
            continue
        digest, _ = truncated_copy(src / LOGS_DIR / TEST_LOG, dst / "accuracy" / TEST_LOG)
        _write(dst / "accuracy" / ACCURACY_TXT, f"hash={digest}\n")
        if not result.accuracy_pass:
            for name in (BASELINE_ACCURACY, COMPLIANCE_ACCURACY):
                if (src / name).is_file():
                    _copy(src / name, dst / "accuracy" / name)


def _build_findings(sub: Submission, inputs: Inputs, unspecified: list[str], guessed: list[str]) -> None:
    """What the builder knows that the tree alone cannot show."""
    import socket

    from .accuracy import STANDIN_TAG

    b, record = sub.build, inputs.perf_run.record
    config = record.get("config", {})
    if not record.get("valid_for_accuracy", config.get("model_source") in ("hf", "mlcommons")):
        b.warn("performance run", f"model_source {config.get('model_source')!r} is not SDXL with its real weights: "
               "the numbers only rehearse the submission", "submit a run with model_source hf or mlcommons")
    if STANDIN_TAG in inputs.accuracy_txt.name:
        b.warn(inputs.accuracy_txt.name, "stand-in metric models: CLIP and FID are fake",
               "re-run notebooks/05_accuracy.ipynb with -p metric_models official")
    if unspecified:
        b.warn(f"systems/{sub.system_id}.json", "fields the kit cannot detect are 'not specified': "
               + ", ".join(unspecified), "set them with -y 'system_overrides: {cooling: air, ...}'")
    if guessed:
        b.warn(f"systems/{sub.system_id}.json", "guessed from the GPU name: " + ", ".join(guessed),
               "check them; correct with system_overrides")
    machine = record.get("machine") or {}
    if machine.get("hostname") and machine["hostname"] != socket.gethostname():
        b.warn(f"systems/{sub.system_id}.json", f"the run ran on {machine['hostname']}, this is "
               f"{socket.gethostname()}: CPU topology, disk and network were read here", "build on the benchmark node "
               "or correct these fields with system_overrides")
    for test, result in inputs.compliance.items():
        if not result.passed:
            b.warn(f"compliance {test}", f"{test} did not pass ({Path(result.directory).name})",
                   "see its verify_*.txt; re-run it with -p run_compliance True")


# --------------------------------------------------------------------------------------------------
# The structural check: the checker's rules the kit can know, every problem at once
# --------------------------------------------------------------------------------------------------

def check_tree(tree: str | Path, mlperf_round: str = DEFAULT_ROUND) -> CheckReport:
    """Walk a submission tree (the folder holding closed/ or open/) as the MLPerf checker does."""
    tree = Path(tree)
    rnd = get_round(mlperf_round)
    report = CheckReport()
    if not tree.is_dir():
        report.error(str(tree), "not a directory")
        return report
    stray = [p.name for p in tree.iterdir() if p.is_file() and p.suffix not in (".md", ".pdf")]
    if stray:
        report.error(".", f"files beside the division folders: {', '.join(stray)}", "only .md/.pdf may sit at the top")
    divisions = [p for p in sorted(tree.iterdir()) if p.is_dir() and p.name not in (".git", ".github", "assets")]
    if not divisions:
        report.error(".", "no division folder (open/ or closed/)")
    for division in divisions:
        if division.name not in VALID_DIVISIONS:
            report.error(division.name, "not a division", f"use one of {', '.join(VALID_DIVISIONS)}")
            continue
        files = [p.name for p in division.iterdir() if p.is_file()]
        if files:
            report.error(division.name, f"files directly in the division folder: {', '.join(files)}",
                         "only submitter folders may sit there")
        for submitter in sorted(p for p in division.iterdir() if p.is_dir()):
            _check_submitter(report, tree, division.name, submitter, rnd)
    return report


def _rel(path: Path, tree: Path) -> str:
    return str(path.relative_to(tree)) if path.is_relative_to(tree) else str(path)


def _check_submitter(report: CheckReport, tree: Path, division: str, root: Path, rnd: Round) -> None:
    _check_hygiene(report, tree, root)
    code = root / ("src" if rnd.layout == "v6" else "code")
    if not code.is_dir():
        report.error(_rel(root, tree), f"no {code.name}/ folder",
                     f"the {rnd.layout} layout needs {code.name}/{BENCHMARK}/")
    results = root / "results"
    if not results.is_dir():
        report.error(_rel(root, tree), "no results/ folder")
        return
    systems = {p.stem for p in (root / "systems").glob("*.json")}
    for system_dir in sorted(p for p in results.iterdir() if p.is_dir()):
        system_type = _check_system(report, tree, root, system_dir.name, division)
        for bench in sorted(p for p in system_dir.iterdir() if p.is_dir()):
            _check_benchmark(report, tree, root, bench, division, system_type, rnd)
    for orphan in sorted(systems - {p.name for p in results.iterdir() if p.is_dir()}):
        report.warn(_rel(root / "systems" / f"{orphan}.json", tree), "a system description without results")


def _check_hygiene(report: CheckReport, tree: Path, root: Path) -> None:
    """File size, hidden names, spaces, caches, empty folders, broken links: rejected by the checker."""
    for path in sorted(root.rglob("*")):
        where = _rel(path, tree)
        if path.is_symlink() and not path.exists():
            report.error(where, "broken symbolic link", "replace it by the file")
        elif path.is_file() and path.stat().st_size > FILE_LIMIT_BYTES:
            report.error(where, f"{path.stat().st_size / 2**20:.1f} MB: over the 50 MB limit per file",
                         "truncate accuracy logs; leave large files out")
        if path.name.startswith("."):
            report.error(where, "name starts with '.' (git-unfriendly)", "rename or remove it")
        if " " in path.name:
            report.error(where, "space in the name", "rename it")
        if path.is_dir() and path.name == "__pycache__":
            report.error(where, "__pycache__ folder", "remove it")
        elif path.is_dir() and not any(path.iterdir()):
            report.error(where, "empty folder", "remove it")


def _check_system(report: CheckReport, tree: Path, root: Path, system: str, division: str) -> str | None:
    """systems/<system>.json: required fields, non-empty fields, allowed values, submitter and division."""
    from .system import SYSTEM_DESC_NONEMPTY_FIELDS, SYSTEM_DESC_REQUIRED_FIELDS

    path = root / "systems" / f"{system}.json"
    where = _rel(path, tree)
    if not path.is_file():
        report.error(where, f"no system description for results/{system}")
        return None
    try:
        desc = json.loads(path.read_text())
    except ValueError as exc:
        report.error(where, f"not valid JSON ({exc})")
        return None
    absent = [k for k in SYSTEM_DESC_REQUIRED_FIELDS if k not in desc]
    empty = [k for k in SYSTEM_DESC_NONEMPTY_FIELDS if k in desc and not desc[k]]
    if absent:
        report.error(where, f"required fields missing: {', '.join(absent)}", "add them (system_overrides)")
    if empty:
        report.error(where, f"fields that need a meaningful value are empty: {', '.join(empty)}",
                     "fill them with system_overrides")
    if str(desc.get("status", "")).lower() not in STATUSES:
        report.error(where, f"status {desc.get('status')!r} is not one of {', '.join(STATUSES)}")
    if desc.get("system_type") not in CATEGORIES:
        report.error(where, f"system_type {desc.get('system_type')!r} is not one of {', '.join(CATEGORIES)}")
    if str(desc.get("submitter", "")).lower() != root.name.lower():
        report.error(where, f"submitter {desc.get('submitter')!r} does not match the folder {root.name!r}")
    if desc.get("division") != division:
        report.error(where, f"division {desc.get('division')!r} does not match the folder {division!r}")
    return desc.get("system_type")


def _check_benchmark(report: CheckReport, tree: Path, root: Path, bench: Path, division: str,
                     system_type: str | None, rnd: Round) -> None:
    where = _rel(bench, tree)
    if bench.name != BENCHMARK:
        (report.error if division == "closed" else report.warn)(
            where, f"benchmark folder {bench.name!r} is not {BENCHMARK!r}", "use the official benchmark name")
        return
    scenarios = {p.name for p in bench.iterdir() if p.is_dir()}
    required = REQUIRED_SCENARIOS[rnd.layout].get(system_type or "", set())
    if division == "closed" and required is None:
        report.error(where, f"in {rnd.name}, {BENCHMARK} is not a {system_type} benchmark",
                     "use category edge or datacenter,edge")
    elif division == "closed" and required - scenarios:
        report.error(where, f"closed {system_type} needs scenarios {', '.join(sorted(required - scenarios))} too "
                     f"(the kit runs {SCENARIO} only)", "submit open, or add the other scenarios' results")
    for scenario in sorted(scenarios):
        if scenario != SCENARIO:
            report.warn(_rel(bench / scenario, tree), "scenario not checked by the kit (it runs Offline only)")
            continue
        _check_scenario(report, tree, root, bench / scenario, division, rnd)


def _check_scenario(report: CheckReport, tree: Path, root: Path, scenario: Path, division: str, rnd: Round) -> None:
    system = scenario.parent.parent.name
    paths = layout_paths(rnd.layout, root, system)
    _check_measurements(report, tree, paths, system, rnd)
    _check_accuracy(report, tree, scenario / "accuracy", division, rnd)
    _check_performance(report, tree, scenario / "performance" / "run_1", division, rnd)
    _check_compliance(report, tree, paths["compliance"], division, rnd)


def _check_measurements(report: CheckReport, tree: Path, paths: dict[str, Path], system: str, rnd: Round) -> None:
    where = paths["measurements"]
    if not where.is_dir():
        report.error(_rel(where, tree), "no measurements folder")
        return
    for name in MEASURE_FILES[rnd.layout]:
        path = where / name
        if not path.is_file():
            report.error(_rel(path, tree), "missing")
        elif path.stat().st_size == 0:
            report.error(_rel(path, tree), "empty")
    impl = paths["implementation"]
    if rnd.layout == "v4":
        impl = next((p for p in sorted(where.glob(f"{system}*.json"))), impl)
    if not impl.is_file():
        report.error(_rel(impl, tree), "implementation JSON missing", "it lists data types and starting weights")
    else:
        try:
            fields = json.loads(impl.read_text())
        except ValueError as exc:
            report.error(_rel(impl, tree), f"not valid JSON ({exc})")
            fields = {}
        empty = [k for k in IMPLEMENTATION_FIELDS if not fields.get(k)]
        if fields and empty:
            report.error(_rel(impl, tree), f"fields missing or empty: {', '.join(empty)}")
    if not paths["code"].parent.is_dir():
        report.error(_rel(paths["code"].parent, tree), "code folder missing")


def _unexpected(folder: Path, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """(missing, extra) files of a folder against the checker's exact list."""
    present = {p.name for p in folder.iterdir() if p.is_file()} if folder.is_dir() else set()
    return sorted(set(required) - present), sorted(present - set(required) - set(optional) - set(OPTIONAL_FILES))


def _files(report: CheckReport, tree: Path, folder: Path, required: tuple[str, ...],
           optional: tuple[str, ...] = ()) -> bool:
    """The folder holds exactly the checker's files (plus optional ones); each difference is reported."""
    missing, extra = _unexpected(folder, required, optional)
    if not folder.is_dir():
        report.error(_rel(folder, tree), "missing")
        return False
    if missing:
        report.error(_rel(folder, tree), f"missing files: {', '.join(missing)}")
    if extra:
        report.error(_rel(folder, tree), f"files the checker does not allow here: {', '.join(extra)}", "remove them")
    return not missing


def _check_detail_errors(report: CheckReport, tree: Path, detail: dict, path: Path) -> None:
    if detail.get("errors"):
        report.error(_rel(path, tree), f"loadgen logged errors: {detail['errors'][:3]}", "fix the cause and run again")


def _check_performance(report: CheckReport, tree: Path, folder: Path, division: str, rnd: Round,
                       audit: bool = False) -> None:
    """VALID, the round's seeds, no errors; for closed also 5000 samples per query, 600 s, 5000 performance samples."""
    from .harness import parse_detail_log

    if not _files(report, tree, folder, PERF_FILES, (ACCURACY_LOG,)):
        return
    path = folder / DETAIL
    detail = parse_detail_log(path)
    where = _rel(path, tree)
    if detail.get("result_validity") != "VALID":
        report.error(where, f"result_validity is {detail.get('result_validity')!r}, not VALID",
                     "see the summary's warnings; for full runs set target_qps so that the run lasts 600 s")
    seeds = {k: detail.get(f"effective_{k}") for k in rnd.seeds}
    if seeds != rnd.seeds:
        other = round_of_seeds(seeds)
        report.error(where, f"loadgen seeds are not {rnd.name}'s" + (f" (they are {other.name}'s)" if other else ""),
                     f"run again with -p mlperf_round {rnd.name}, or build for the round the run used")
    _check_detail_errors(report, tree, detail, path)
    limits = [("effective_samples_per_query", CLOSED_MIN_SAMPLES_PER_QUERY, "samples per query"),
              ("effective_min_duration_ms", CLOSED_MIN_DURATION_MS, "min_duration (ms)"),
              ("effective_performance_sample_count", CLOSED_PERFORMANCE_SAMPLE_COUNT, "performance_sample_count")]
    for key, minimum, label in limits:
        value = detail.get(key)
        if value is None or int(value) < minimum:
            if division == "closed":
                report.error(where, f"{label} is {value}, closed needs >= {minimum}",
                             "run the full variant (-p variant full) with target_qps set to your samples/s")
            elif not audit:  # said once, for the submitted run
                report.warn(where, f"{label} is {value} (< {minimum}): the official checker rejects short runs; "
                            "SCC's short-run checker accepts them")


def _scores(text: str, quoted: bool) -> dict[str, float]:
    found = {}
    for key in ("CLIP_SCORE", "FID_SCORE"):
        pattern = re.compile(SCORE_PATTERNS[quoted].format(key=key))
        for line in text.splitlines():
            if match := pattern.match(line):
                found[key] = float(match.group(1))
    return found


def _check_accuracy(report: CheckReport, tree: Path, folder: Path, division: str, rnd: Round) -> None:
    """Exact file list, accuracy.txt (scores in the round's format, hash), log <= 10 KiB, images, dataset size."""
    from .harness import parse_detail_log

    if not _files(report, tree, folder, ACC_FILES):
        if not folder.is_dir():
            return
    txt = folder / ACCURACY_TXT
    if txt.is_file():
        text = txt.read_text(errors="replace")
        scores = _scores(text, rnd.accuracy_quoted)
        form = "quoted numbers" if rnd.accuracy_quoted else "bare numbers, one space after the colon"
        if set(scores) != {"CLIP_SCORE", "FID_SCORE"}:
            report.error(_rel(txt, tree), f"no CLIP_SCORE/FID_SCORE line in the {rnd.name} format ({form})",
                         "05_accuracy writes the format of its mlperf_round: re-run it with "
                         f"-p mlperf_round {rnd.name}")
        if not any(HASH_PATTERN.match(line.strip()) for line in text.splitlines()):
            report.error(_rel(txt, tree), "no hash=<sha256 of mlperf_log_accuracy.json> line")
        bounds = {"CLIP_SCORE": C.CLIP_BOUNDS, "FID_SCORE": C.FID_BOUNDS}
        outside = [f"{k} {v} (window {bounds[k][0]}..{bounds[k][1]})" for k, v in scores.items()
                   if not bounds[k][0] <= v <= bounds[k][1]]
        if outside:
            (report.error if division == "closed" else report.warn)(
                _rel(txt, tree), "accuracy outside the closed-division window: " + "; ".join(outside),
                "closed needs both inside; the open division accepts any value")
    log = folder / ACCURACY_LOG
    if log.is_file() and log.stat().st_size > MAX_ACCURACY_LOG_BYTES:
        report.error(_rel(log, tree), f"{log.stat().st_size} bytes: not truncated (limit {MAX_ACCURACY_LOG_BYTES})",
                     "build the submission with sccsdxl.submission (it truncates the copy)")
    detail = parse_detail_log(folder / DETAIL)
    _check_detail_errors(report, tree, detail, folder / DETAIL)
    total = detail.get("qsl_reported_total_count")
    if rnd.dataset_size_check and total is not None and int(total) != C.DATASET_ROWS:
        (report.error if division == "closed" else report.warn)(
            _rel(folder / DETAIL, tree), f"the accuracy run covers {total} samples; {rnd.name}'s checker wants "
            f"{C.DATASET_ROWS}", "run the full variant (the checker's --skip-dataset-size-check relaxes this)")
    _check_images(report, tree, folder / "images", division, rnd)


def _check_images(report: CheckReport, tree: Path, folder: Path, division: str, rnd: Round) -> None:
    wanted = [f"{i}.png" for i in compliance_ids(rnd.name)] + ["captions.txt"]
    missing = [name for name in wanted if not (folder / name).is_file()]
    if missing:
        (report.error if division == "closed" else report.warn)(
            _rel(folder, tree), f"{rnd.name}'s compliance images missing: {', '.join(missing)}",
            "they exist only in runs that include those samples (variant full); 05_accuracy saves them"
            + ("" if division == "closed" else "; the open division accepts their absence"))


def _check_compliance(report: CheckReport, tree: Path, where: Path, division: str, rnd: Round) -> None:
    """TEST01 and TEST04: required for closed, checked when present for open."""
    from .compliance import BASELINE_ACCURACY, COMPLIANCE_ACCURACY, TESTS, VERIFY_ACCURACY, VERIFY_PERFORMANCE

    for test in TESTS:
        folder = where / test
        if not folder.is_dir():
            if division == "closed":
                report.error(_rel(folder, tree), "compliance test missing", "run it: -p run_compliance True")
            continue
        verify = folder / VERIFY_PERFORMANCE
        if "TEST PASS" not in (verify.read_text() if verify.is_file() else ""):
            report.error(_rel(verify, tree), "missing or without TEST PASS", f"see the file; re-run {test}")
        _check_performance(report, tree, folder / "performance" / "run_1", division, rnd, audit=True)
        if test != "TEST01":
            continue
        acc = folder / VERIFY_ACCURACY
        identical = "TEST PASS" in (acc.read_text() if acc.is_file() else "")
        if not acc.is_file():
            report.error(_rel(acc, tree), "missing")
        extra = () if identical else (BASELINE_ACCURACY, COMPLIANCE_ACCURACY)
        if _files(report, tree, folder / "accuracy", (ACCURACY_LOG, ACCURACY_TXT, *extra)) and not identical:
            _check_fallback(report, tree, folder / "accuracy", rnd)


def _check_fallback(report: CheckReport, tree: Path, folder: Path, rnd: Round) -> None:
    from .compliance import ACCURACY_DELTA_PERCENT, BASELINE_ACCURACY, COMPLIANCE_ACCURACY

    base = _scores((folder / BASELINE_ACCURACY).read_text(), rnd.accuracy_quoted)
    test = _scores((folder / COMPLIANCE_ACCURACY).read_text(), rnd.accuracy_quoted)
    for key, limit in ACCURACY_DELTA_PERCENT.items():
        if not base.get(key) or not test.get(key):
            report.error(_rel(folder, tree), f"TEST01 fallback: {key} missing from the baseline/compliance files")
        elif abs(1 - base[key] / test[key]) * 100 > limit:
            report.error(_rel(folder, tree), f"TEST01 fallback: {key} differs by "
                         f"{abs(1 - base[key] / test[key]) * 100:.2f} % (limit {limit} %)",
                         "the responses change between runs: make the pipeline deterministic")


# --------------------------------------------------------------------------------------------------
# Packing, the report, the official checker, pushing
# --------------------------------------------------------------------------------------------------

def _tar_filter(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def pack(sub: Submission) -> Path:
    """mlperf_submission.tar.gz: the division folders at the top, as the results repository holds them."""
    path = sub.directory / TARBALL
    if path.exists():
        raise OutputError(f"{path} already exists", "build a new submission (each build gets its own directory)")
    tmp = path.with_name(path.name + ".part")
    with tarfile.open(tmp, "w:gz") as tar:
        for division in sorted(p for p in sub.tree.iterdir() if p.is_dir()):
            tar.add(division, arcname=division.name, filter=_tar_filter)
    tmp.replace(path)
    sub.files["tarball"] = str(path)
    return path


def check_archive(tarball: str | Path, mlperf_round: str) -> CheckReport:
    """Unpack the archive into a temporary folder and check that, as the results repository will see it."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="sccsdxl-unpacked-") as tmp:
        return check_tree(unpack(tarball, Path(tmp) / "submission"), mlperf_round)


def unpack(tarball: str | Path, destination: str | Path) -> Path:
    """Extract a submission archive into a new folder (no absolute paths, links out or devices accepted)."""
    destination = Path(destination)
    if destination.exists() and any(destination.iterdir()):
        raise OutputError(f"{destination} is not empty", "unpack into a new folder")
    destination.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball, "r:gz") as tar:
        try:
            tar.extractall(destination, filter="data")
        except TypeError:  # Python without extraction filters: check the names ourselves
            for member in tar.getmembers():
                if not (destination / member.name).resolve().is_relative_to(destination.resolve()) or \
                        member.issym() or member.islnk() or member.isdev():
                    raise OutputError(f"{tarball} holds an unsafe entry {member.name!r}", "rebuild the archive")
            tar.extractall(destination)
    return destination


def tree_text(root: str | Path, limit: int = 120) -> str:
    """The tree as indented lines (folders end in '/'), at most ``limit`` lines."""
    root = Path(root)
    lines = [f"{root.name}/"]
    for path in sorted(root.rglob("*")):
        depth = len(path.relative_to(root).parts)
        size = "" if path.is_dir() else f"  ({path.stat().st_size:,} B)"
        lines.append("  " * depth + path.name + ("/" if path.is_dir() else "") + size)
    if len(lines) > limit:
        lines = lines[:limit] + [f"... {len(lines) - limit} more"]
    return "\n".join(lines)


def write_check(sub: Submission, report: CheckReport) -> Path:
    path = sub.directory / CHECK_FILE
    path.write_text(report.text())
    sub.files["check"] = str(path)
    return path


@dataclass
class CheckerRun:
    """One run of the official MLPerf submission checker."""

    command: list[str]
    cwd: str
    returncode: int
    output: str
    csv: str

    @property
    def passed(self) -> bool:
        return self.returncode == 0

    def summary(self, tail: int = 20) -> str:
        lines = self.output.splitlines()
        key = [line for line in lines if "SUMMARY" in line or "ERROR" in line]
        return "\n".join((key[-tail:] if key else []) + ["..."] + lines[-tail:])

    def as_dict(self) -> dict[str, Any]:
        return {"command": self.command, "cwd": self.cwd, "returncode": self.returncode, "passed": self.passed,
                "csv": self.csv, "summary": self.summary()}


def checker_command(checker_path: str | Path, tree: Path, mlperf_round: str, submitter: str,
                    csv: Path) -> tuple[list[str], Path]:
    """The checker's command line for a checkout of mlcommons/inference: v4.x script or the modular v5+/HEAD one."""
    import sys

    root = Path(checker_path).expanduser()
    tools = root / "tools" / "submission"
    args = ["--input", str(Path(tree).resolve()), "--version", get_round(mlperf_round).name,
            "--submitter", submitter, "--csv", str(Path(csv).resolve())]
    if (tools / "submission_checker" / "main.py").is_file():
        return [sys.executable, "-m", "submission_checker.main", *args], tools
    if (tools / "submission_checker.py").is_file():
        return [sys.executable, str(Path("tools") / "submission" / "submission_checker.py"), *args], root
    raise ParameterError(f"checker_path {str(root)!r} holds no MLPerf submission checker "
                         "(tools/submission/submission_checker.py or tools/submission/submission_checker/main.py)",
                         "point it at a checkout of https://github.com/mlcommons/inference (for v4.1 check out the "
                         "v4.1 checker: commit 35c7e1f0), or leave checker_path empty")


def run_checker(checker_path: str | Path, tree: Path, mlperf_round: str, submitter: str, workdir: Path,
                timeout: float = 1800) -> CheckerRun:
    """Run the official checker as a subprocess on the tree; its verdict is its exit status."""
    csv = Path(workdir) / "checker_summary.csv"
    command, cwd = checker_command(checker_path, tree, mlperf_round, submitter, csv)
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise KitError(f"the MLPerf checker ran over {timeout:.0f} s", "run it by hand: " + " ".join(command)) from None
    output = done.stdout + done.stderr
    (Path(workdir) / "checker_output.txt").write_text(output)
    return CheckerRun(command, str(cwd), done.returncode, output, str(csv))


@dataclass
class PushResult:
    repo: str
    branch: str
    commit: str
    clone: str
    pushed: bool
    message: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _redact(url: str) -> str:
    """A repository URL without credentials (https://user:token@host/... -> https://***@host/...)."""
    return re.sub(r"//[^/@\s]+@", "//***@", str(url))


GIT_LOCATION_VARIABLES = ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY", "GIT_COMMON_DIR",
                          "GIT_ALTERNATE_OBJECT_DIRECTORIES", "GIT_NAMESPACE", "GIT_PREFIX")


def _git_env() -> dict[str, str]:
    """The environment for git: no inherited repository location, never a password prompt."""
    env = {k: v for k, v in os.environ.items() if k not in GIT_LOCATION_VARIABLES}
    env["GIT_TERMINAL_PROMPT"] = "0"  # never wait for a password in a headless run
    return env


def _git(args: list[str], cwd: Path, repo: str) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, env=_git_env(), timeout=600,
                              check=False)
    except subprocess.TimeoutExpired:
        raise KitError(f"git {args[0]} ran over 10 minutes", "check the network and the repository URL") from None
    if done.returncode != 0:
        error = _redact((done.stderr or done.stdout).strip()[-800:])
        raise KitError(f"git {args[0]} failed for {_redact(repo)}: {error}",
                       "check the URL, the branch and your credentials (ssh key or token); your fork of "
                       "mlcommons/cm4mlperf-inference must exist and be writable")
    return done.stdout.strip()


def push_results(sub: Submission, repo: str, branch: str = DEFAULT_BRANCH, message: str = "") -> PushResult:
    """Commit the tree to ``branch`` of the team's results repository (their fork) and push it."""
    if shutil.which("git") is None:
        raise KitError("git is not installed", "install git, or push the tarball's contents by hand")
    if not str(repo).strip() or str(repo).strip().startswith("-"):
        raise ParameterError(f"push_repo {repo!r} is not a repository URL or path",
                             "pass your fork, e.g. -p push_repo git@github.com:TEAM/cm4mlperf-inference.git")
    if not re.fullmatch(r"[A-Za-z0-9._/-]+", branch) or branch.startswith(("-", "/")) or ".." in branch:
        raise ParameterError(f"branch name {branch!r} is not allowed", f"use e.g. {DEFAULT_BRANCH}")
    clone = sub.directory / "push-clone"
    n = 1
    while clone.exists():
        n += 1
        clone = sub.directory / f"push-clone-{n}"
    remote_has_branch = bool(_git(["ls-remote", "--heads", repo, branch], sub.directory, repo))
    remote_empty = not remote_has_branch and not _git(["ls-remote", repo], sub.directory, repo)
    sparse = [] if remote_empty else ["--filter=blob:none", "--sparse"]  # check out only our folder of a big repo
    _git(["clone", "--quiet", "--depth", "1", *sparse, *(["--branch", branch] if remote_has_branch else []), "--",
          repo, str(clone)], sub.directory, repo)
    target = f"{sub.options.division}/{sub.options.submitter}"
    if sparse:
        _git(["sparse-checkout", "set", target], clone, repo)
    if not remote_has_branch:
        _git(["checkout", "--quiet", "-b", branch], clone, repo)
    shutil.copytree(sub.root, clone / target, dirs_exist_ok=True)
    _git(["add", "--all", "--", target], clone, repo)
    if not _git(["status", "--porcelain", "--", target], clone, repo):
        return PushResult(_redact(repo), branch, _git(["rev-parse", "HEAD"], clone, repo), str(clone), False,
                          "nothing changed since the last push")
    identity = [] if _git_quiet(["config", "user.email"], clone) else \
        ["-c", "user.name=sccsdxl", "-c", f"user.email={sub.options.submitter}@sccsdxl.invalid"]
    text = message or f"MLPerf Inference {sub.round} {BENCHMARK} {SCENARIO} results of {sub.options.submitter}"
    _git([*identity, "commit", "--quiet", "-m", text], clone, repo)
    _git(["push", "--quiet", "origin", f"HEAD:refs/heads/{branch}"], clone, repo)
    return PushResult(_redact(repo), branch, _git(["rev-parse", "HEAD"], clone, repo), str(clone), True, text)


# --------------------------------------------------------------------------------------------------
# mlperf_submission.md
# --------------------------------------------------------------------------------------------------

def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def progression(inputs: Inputs) -> list[tuple[str, float]]:
    """(step, samples/s) from baseline through sweep and optimizations to the submitted run."""
    steps = []
    baseline = inputs.records.get("02_baseline", {})
    base = _number(baseline.get("samples_per_second"))
    same_run = baseline.get("run_dir") and \
        _resolve_run_dir(baseline["run_dir"], inputs.output_dir).resolve() == Path(inputs.perf_run.run_dir).resolve()
    if base and not same_run:
        steps.append(("baseline (02)", base))
    for notebook, label in (("03_batch_size_sweep", "best sweep point (03)"), ("04_quantization", "optimized (04)")):
        record = inputs.records.get(notebook, {})
        best = _best(record)
        value = _number(best.get("samples_per_second", record.get("samples_per_second")))
        if value:
            steps.append((label, value))
    final = _number((inputs.perf_run.result("performance") or {}).get("samples_per_second"))
    if final:
        steps.append(("submitted = baseline (02)" if same_run and len(steps) == 0 else "submitted", final))
    return steps


def plot_progression(steps: list[tuple[str, float]]):
    """Bar chart of samples/s per step, with the speedup over the first."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    names, values = [s for s, _ in steps], [v for _, v in steps]
    bars = ax.bar(names, values, color=["tab:gray"] + ["tab:blue"] * (len(values) - 2) + ["tab:green"]
                  if len(values) > 1 else ["tab:green"])
    for bar, value in zip(bars, values):
        ax.annotate(f"{value:.3g}\n(x{value / values[0]:.2f})", (bar.get_x() + bar.get_width() / 2, value),
                    ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("samples/s (Offline)")
    ax.set_ylim(0, max(values) * 1.3)
    ax.set_title("Throughput: how it was reached")
    fig.tight_layout()
    return fig


def _figures(inputs: Inputs) -> list[Path]:
    """Plots the notebooks left behind (paths named in records, sweep plots)."""
    found: list[Path] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, str) and value.endswith(".png") and Path(value).is_file():
            found.append(Path(value))

    walk(inputs.records)
    found += sorted((inputs.output_dir / "sweep").glob("*/*.png"))
    return list(dict.fromkeys(p.resolve() for p in found))


def _best(record: dict) -> dict:
    """The operating point a 03/04 record settled on ('best' of the sweep, 'chosen' of the quantization guard)."""
    return next((record[k] for k in ("best", "chosen") if isinstance(record.get(k), dict)), {})


def _highlights(record: dict) -> list[str]:
    """A few readable facts from a 03/04 record, whatever its exact shape."""
    lines = []
    best = _best(record)
    if best:
        lines.append("best: " + ", ".join(f"{k} {v}" for k, v in best.items() if not isinstance(v, (dict, list))))
    for key in ("speedup", "samples_per_second", "batch_size", "gpus", "optimizations"):
        if key in record and not isinstance(record[key], (dict, list)):
            lines.append(f"{key}: {record[key]}")
    rows = next((record[k] for k in ("results", "rows", "configurations", "points")
                 if isinstance(record.get(k), list)), [])
    for row in rows[:12]:
        if isinstance(row, dict):
            lines.append(", ".join(f"{k} {v}" for k, v in row.items() if not isinstance(v, (dict, list)))[:200])
    return lines


def write_report(sub: Submission, inputs: Inputs, check: CheckReport, checker: CheckerRun | None = None,
                 push: PushResult | None = None) -> Path:
    """mlperf_submission.md: platform, throughput and how it was reached, accuracy, compliance, figures."""
    desc, config = sub.system, inputs.perf_run.record.get("config", {})
    perf = inputs.perf_run.result("performance") or {}
    figures_dir = sub.directory / FIGURES_DIR
    steps = progression(inputs)
    figures = []
    if steps:
        figures_dir.mkdir(exist_ok=True)
        fig = plot_progression(steps)
        fig.savefig(figures_dir / "throughput.png", dpi=110)
        import matplotlib.pyplot as plt

        plt.close(fig)
        figures.append(figures_dir / "throughput.png")
    for src in _figures(inputs):
        figures_dir.mkdir(exist_ok=True)
        figures.append(_copy(src, figures_dir / f"{len(figures):02d}-{src.name}"))
    platform = [("system", f"{desc.get('system_name')} (`{sub.system_id}`)"),
                ("accelerators", f"{desc.get('accelerators_per_node')} x {desc.get('accelerator_model_name')}, "
                                 f"{desc.get('accelerator_memory_capacity')}"),
                ("CPU", f"{desc.get('host_processors_per_node')} x {desc.get('host_processor_model_name')}"),
                ("memory", desc.get("host_memory_capacity")), ("OS", desc.get("operating_system")),
                ("framework", desc.get("framework")), ("software", desc.get("other_software_stack"))]
    acc_text = inputs.accuracy_txt.read_text(errors="replace")
    scores = _scores(acc_text, True) or _scores(acc_text, False)
    lines = [f"# MLPerf Inference {sub.round}: Stable Diffusion XL, Offline — team {sub.options.submitter}", "",
             f"{sub.options.division} division, {sub.options.category}; built {datetime.now():%Y-%m-%d %H:%M} "
             f"with sccsdxl ({kit_version()['commit']}).", "", "## Platform", "", "| | |", "|---|---|",
             *(f"| {k} | {v} |" for k, v in platform), "", "## Result", "",
             f"**{perf.get('samples_per_second')} samples/s** (loadgen Offline, "
             f"{'VALID' if perf.get('valid') else 'INVALID'}, {perf.get('samples')} samples per query), "
             f"run `{Path(inputs.perf_run.run_dir).name}`.", "", "| setting | value |", "|---|---|",
             *(f"| {k} | {v} |" for k, v in _config_rows(config, perf)), "", "## How it was reached", ""]
    if steps:
        lines += [f"- {name}: {value:.4g} samples/s (x{value / steps[0][1]:.2f})" for name, value in steps]
    for notebook in ("03_batch_size_sweep", "04_quantization"):
        if notebook in inputs.records:
            lines += ["", f"**{notebook}**", ""] + [f"- {h}" for h in _highlights(inputs.records[notebook])]
    lines += ["", "## Accuracy", "", f"`{inputs.accuracy_txt.name}` of run `{Path(inputs.accuracy_run.run_dir).name}`: "
              + (", ".join(f"{k} {v:.4f}" for k, v in scores.items()) or "no scores found"),
              f"(closed window: CLIP {C.CLIP_BOUNDS[0]}..{C.CLIP_BOUNDS[1]}, "
              f"FID {C.FID_BOUNDS[0]}..{C.FID_BOUNDS[1]}).", ""]
    lines += [f"- {note}" for note in (inputs.records.get("05_accuracy", {}).get("notes") or [])]
    lines += ["", "## Compliance", ""] + ([f"- {t}: {'PASS' if r.passed else 'FAIL'} ({r.samples_per_second} vs "
                                           f"{r.reference_samples_per_second} samples/s)"
                                           for t, r in sorted(inputs.compliance.items())] or ["- not run (optional "
                                                                                              "for the open division)"])
    lines += ["", "## Checks", "", f"- kit structural check: {len(check.errors)} error(s), {len(check.warnings)} "
              f"warning(s) (`{CHECK_FILE}`)"]
    if checker is not None:
        lines.append(f"- MLPerf checker: {'passed' if checker.passed else 'FAILED'} (exit {checker.returncode})")
    if push is not None:
        lines.append(f"- pushed to {push.repo}, branch {push.branch}, commit {push.commit[:12]}")
    lines += ["", "## Reproduce", "", f"`{RUN_SCRIPT}` holds the exact commands, in order.", ""]
    if figures:
        lines += ["## Figures", ""] + [f"![{p.stem}]({FIGURES_DIR}/{p.name})" for p in figures] + [""]
    path = _write(sub.directory / REPORT_MD, "\n".join(lines))
    sub.files["report"] = str(path)
    return path


# --------------------------------------------------------------------------------------------------
# Notebook helpers
# --------------------------------------------------------------------------------------------------

def artifacts_table(sub: Submission):
    """Where the files are."""
    import pandas as pd

    rows = [("tree", str(sub.tree))] + [(k, v) for k, v in sub.files.items()
                                       if k in ("tarball", "run_script", "report", "check")]
    return pd.DataFrame(rows, columns=["artifact", "path"])


def submission_record(sub: Submission, inputs: Inputs, check: CheckReport, unpacked: CheckReport | None,
                      checker: CheckerRun | None, push: PushResult | None, params: dict[str, Any]) -> dict[str, Any]:
    """The 06_submission record: where everything went and what the checks said."""
    perf = inputs.perf_run.result("performance") or {}
    return {
        "parameters": {k: _redact(v) if isinstance(v, str) else v for k, v in params.items()},
        "submission_dir": str(sub.directory), "tree": str(sub.tree), "root": str(sub.root),
        "submitter": sub.options.submitter, "division": sub.options.division, "category": sub.options.category,
        "system_id": sub.system_id, "round": sub.round, "layout": sub.layout, "files": sub.files,
        "run_dir": str(inputs.perf_run.run_dir), "accuracy_run_dir": str(inputs.accuracy_run.run_dir),
        "samples_per_second": perf.get("samples_per_second"), "valid": perf.get("valid"),
        "compliance": {t: r.as_dict() for t, r in inputs.compliance.items()},
        "check": {"errors": [asdict(f) for f in check.errors], "warnings": [asdict(f) for f in check.warnings],
                  "ok": check.ok},
        "unpacked_check_ok": unpacked.ok if unpacked is not None else None,
        "checker": checker.as_dict() if checker else None, "push": push.as_dict() if push else None,
        "notes": sub.options.notes + inputs.notes,
    }


def file_browser(tree: Path):
    """JupyterLab: pick a file of the tree and see it (text, JSON or image)."""
    import ipywidgets as w
    from IPython.display import Image, display

    files = [str(p.relative_to(tree)) for p in sorted(Path(tree).rglob("*")) if p.is_file()]
    choice = w.Dropdown(options=files, description="file", layout=w.Layout(width="95%"))
    output = w.Output()

    def show(_=None):
        path = Path(tree) / choice.value
        with output:
            output.clear_output()
            if path.suffix == ".png":
                display(Image(filename=str(path)))
            else:
                print(path.read_text(errors="replace")[:5000])

    choice.observe(show, names="value")
    show()
    return w.VBox([choice, output])
