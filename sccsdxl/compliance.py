"""MLPerf compliance tests TEST01 and TEST04 for SDXL Offline: run through the harness, verified as the checker wants.

SDXL runs two audits (``mlperf-sdxl.md`` §7). Each is one more loadgen performance run of the submitted
configuration with an ``audit.config`` applied after user.conf:

  TEST01  logs a sample of responses during the performance run; they must be the very bytes the accuracy run
          returned for the same qsl_idx (else: CLIP within 1 % and FID within 2 % of the accuracy run's images
          for the same samples), and the score must stay within 10 % of the submitted run's.
  TEST04  issues one sample over and over (a system that caches answers would speed up): the score must stay
          below 1.10 x the submitted run's.

Every test goes into a new directory ``<run_dir>/compliance/<TEST>[-n]/`` beside the run it audits: the
audit.config, loadgen's logs in ``logs/``, ``verify_performance.txt`` / ``verify_accuracy.txt`` with a
``TEST PASS`` or ``TEST FAIL`` line as the checker expects, and ``result.json``. Closed division only;
the open division may skip them.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from . import constants as C
from .errors import DataError, KitError, ParameterError
from .record import unique_dir, write_json

TESTS = ("TEST01", "TEST04")
COMPLIANCE_DIR = "compliance"  # inside a run directory
LOGS_DIR = "logs"
RESULT_FILE = "result.json"
AUDIT_FILE = "audit.config"
VERIFY_PERFORMANCE = "verify_performance.txt"
VERIFY_ACCURACY = "verify_accuracy.txt"
BASELINE_ACCURACY = "baseline_accuracy.txt"
COMPLIANCE_ACCURACY = "compliance_accuracy.txt"
ACCURACY_LOG = "mlperf_log_accuracy.json"
SUMMARY_LOG = "mlperf_log_summary.txt"
DETAIL_LOG = "mlperf_log_detail.txt"

PERFORMANCE_TOLERANCE = 0.10  # TEST01: within +-10 % of the submitted score; TEST04: below +10 %
ACCURACY_DELTA_PERCENT = {"CLIP_SCORE": 1.0, "FID_SCORE": 2.0}  # TEST01 fallback (checker accuracy-delta-perc)

# The audit settings of mlcommons/inference compliance/TEST01/stable-diffusion-xl and compliance/TEST04.
AUDIT_CONFIGS: dict[str, str] = {
    "TEST01": (
        "# TEST01 (stable-diffusion-xl): performance mode that also logs a sample of responses\n"
        "*.*.mode = 2\n"
        "*.*.accuracy_log_rng_seed = 720381539243781796\n"
        "*.*.accuracy_log_sampling_target = 128\n"
    ),
    "TEST04": (
        "# TEST04: the same sample issued again and again; no caching of results allowed\n"
        "*.Offline.mode = 2\n"
        "*.Offline.performance_issue_unique = 0\n"
        "*.Offline.performance_issue_same = 1\n"
        "*.Offline.performance_issue_same_index = 3\n"
        f"{C.MODEL_NAME}.Offline.min_query_count = 500\n"
    ),
}

# (qsl_idx, image) pairs in, (CLIP_SCORE, FID_SCORE) out: the TEST01 fallback's scorer.
Scorer = Callable[[list[tuple[int, np.ndarray]]], tuple[float, float]]


@dataclass
class ComplianceResult:
    """One audit: where it lives, what it measured, whether it passed."""

    test: str
    directory: str
    reference_samples_per_second: float | None
    samples_per_second: float | None
    performance_pass: bool
    accuracy_pass: bool | None = None  # TEST01: logged responses identical to the accuracy run's
    fallback_pass: bool | None = None  # TEST01 when not identical: CLIP/FID deltas within the limits
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """What the checker accepts: performance, and for TEST01 identical responses or the metric fallback."""
        if self.test != "TEST01":
            return self.performance_pass
        return self.performance_pass and bool(self.accuracy_pass or self.fallback_pass)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ComplianceResult":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


# --------------------------------------------------------------------------------------------------
# audit.config and directories
# --------------------------------------------------------------------------------------------------

def check_test(test: str) -> str:
    """The test name, or a clear error for one the kit does not run."""
    if test not in AUDIT_CONFIGS:
        raise ParameterError(f"unknown compliance test {test!r}", f"SDXL runs {' and '.join(TESTS)}")
    return test


def write_audit_config(test: str, directory: str | Path) -> Path:
    """The test's audit.config in ``directory`` (the harness applies its loadgen keys after user.conf)."""
    path = Path(directory) / AUDIT_FILE
    path.write_text(AUDIT_CONFIGS[check_test(test)])
    return path


def new_test_dir(run_dir: str | Path, test: str) -> Path:
    """A fresh ``<run_dir>/compliance/<TEST>[-n]``: an earlier audit is never overwritten."""
    return unique_dir(Path(run_dir) / COMPLIANCE_DIR, test, f"a {test} directory")


def latest_results(run_dir: str | Path) -> dict[str, ComplianceResult]:
    """The newest finished audit of each test found in ``<run_dir>/compliance/``."""
    found: dict[str, tuple[float, ComplianceResult]] = {}
    for path in sorted((Path(run_dir) / COMPLIANCE_DIR).glob(f"TEST0*/{RESULT_FILE}")):
        try:
            result = ComplianceResult.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        stamp = path.stat().st_mtime
        if result.test in TESTS and (result.test not in found or stamp >= found[result.test][0]):
            found[result.test] = (stamp, result)
    return {test: result for test, (_, result) in found.items()}


# --------------------------------------------------------------------------------------------------
# Performance: the official rule on the two summaries
# --------------------------------------------------------------------------------------------------

def read_summary(path: str | Path) -> dict[str, Any]:
    """Scenario, score (samples/s), validity and error count from mlperf_log_summary.txt."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found", "the loadgen run did not finish; run it again")
    text = path.read_text(errors="replace")

    def value(pattern: str) -> str | None:
        match = re.search(pattern, text, re.M)
        return match.group(1).strip() if match else None

    score = value(r"^Samples per second\s*:\s*(\S+)")
    return {"scenario": value(r"^Scenario\s*:\s*(\S+)"), "score": float(score) if score else None,
            "validity": value(r"^Result is\s*:\s*(\S+)"), "errors": len(re.findall(r"^\d+ ERROR", text, re.M))}


def verify_performance(reference_summary: str | Path, test_summary: str | Path, test: str) -> tuple[bool, str]:
    """TEST01: test score within +-10 % of the reference; TEST04: below +10 %. Returns (passed, report text)."""
    ref, got = read_summary(reference_summary), read_summary(test_summary)
    lines = [f"reference summary: {Path(reference_summary).name}", f"reference score = {ref['score']}",
             f"test score = {got['score']}"]
    verdict = None
    if ref["validity"] != "VALID":
        verdict = "TEST FAIL: the reference run is not VALID"
    elif got["validity"] != "VALID":
        verdict = "TEST FAIL: the test run is not VALID"
    elif ref["scenario"] != got["scenario"]:
        verdict = f"TEST FAIL: scenarios differ ({ref['scenario']} vs {got['scenario']})"
    elif not ref["score"] or got["score"] is None:
        verdict = "TEST FAIL: a score is missing from the summaries"
    if verdict is None:
        upper = ref["score"] * (1 + PERFORMANCE_TOLERANCE)
        lower = ref["score"] * (1 - PERFORMANCE_TOLERANCE) if test == "TEST01" else float("-inf")
        inside = lower < got["score"] < upper
        bound = f"{lower:.6g} < score < {upper:.6g}" if test == "TEST01" else f"score < {upper:.6g}"
        lines.append(f"rule: {bound}")
        verdict = "TEST PASS" if inside else "TEST FAIL: test score out of range"
    for name, info in (("reference", ref), ("test", got)):
        if info["errors"]:
            lines.append(f"WARNING: {info['errors']} ERROR line(s) in the {name} summary")
    lines.append(verdict)
    return verdict == "TEST PASS", "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Accuracy (TEST01): the logged responses against the accuracy run's, streamed
# --------------------------------------------------------------------------------------------------

def _entries(path: Path) -> Iterator[dict]:
    """Each {"seq_id", "qsl_idx", "data"} of a loadgen accuracy log, one at a time."""
    import ijson

    if not path.is_file():
        raise DataError(f"accuracy log {path} not found", "run the accuracy mode (02_baseline) and TEST01 first")
    try:
        with open(path, "rb") as fh:
            yield from ijson.items(fh, "item")
    except (ijson.JSONError, ValueError) as exc:
        raise DataError(f"accuracy log {path} is truncated or malformed ({exc})",
                        "re-run the run that wrote it; a killed run leaves a partial log") from None


def _digest(hex_data: str) -> str:
    return hashlib.sha256(str(hex_data).upper().encode()).hexdigest()


def verify_accuracy(reference_log: str | Path, test_log: str | Path) -> tuple[bool, str, dict[str, int]]:
    """Every response TEST01 logged must equal the accuracy run's response for that qsl_idx (first one wins)."""
    test_entries = [(int(e["qsl_idx"]), _digest(e["data"])) for e in _entries(Path(test_log))]
    wanted = {idx for idx, _ in test_entries}
    reference: dict[int, str] = {}
    total = 0
    for entry in _entries(Path(reference_log)):
        total += 1
        idx = int(entry["qsl_idx"])
        if idx in wanted and idx not in reference:
            reference[idx] = _digest(entry["data"])
    counts = {"reference_entries": total, "test_entries": len(test_entries),
              "matched": sum(1 for idx, d in test_entries if reference.get(idx) == d),
              "different": sum(1 for idx, d in test_entries if idx in reference and reference[idx] != d),
              "missing_in_reference": sum(1 for idx, _ in test_entries if idx not in reference)}
    passed = counts["different"] == 0 and counts["matched"] > 0
    lines = [f"{name} = {value}" for name, value in counts.items()]
    lines.append("TEST PASS" if passed else "TEST FAIL")
    return passed, "\n".join(lines) + "\n", counts


def _images(log: Path, only: set[int] | None = None) -> list[tuple[int, np.ndarray]]:
    """(qsl_idx, image) of the log's first response per sample, optionally only for some qsl_idx."""
    from .accuracy import iter_accuracy_log

    return [(idx, image) for idx, image in iter_accuracy_log(log) if only is None or idx in only]


def accuracy_fallback(reference_log: str | Path, test_log: str | Path, scorer: Scorer,
                      quoted: bool) -> tuple[bool, str, str, dict[str, float]]:
    """CLIP/FID of TEST01's logged images against the accuracy run's images of the same samples.

    Returns (passed, baseline_accuracy.txt, compliance_accuracy.txt, deltas in percent).
    """
    from .accuracy import format_accuracy_line

    test_images = _images(Path(test_log))
    baseline_images = _images(Path(reference_log), {idx for idx, _ in test_images})
    if len(baseline_images) < 2 or len(test_images) < 2:
        raise DataError(f"TEST01 logged {len(test_images)} response(s) that the accuracy run also holds "
                        f"({len(baseline_images)}); FID needs at least 2", "run TEST01 with more samples")
    base_clip, base_fid = scorer(baseline_images)
    test_clip, test_fid = scorer(test_images)
    deltas = {"CLIP_SCORE": abs(1 - base_clip / test_clip) * 100, "FID_SCORE": abs(1 - base_fid / test_fid) * 100}
    passed = all(deltas[k] <= ACCURACY_DELTA_PERCENT[k] for k in deltas)
    return (passed, format_accuracy_line(base_fid, base_clip, quoted) + "\n",
            format_accuracy_line(test_fid, test_clip, quoted) + "\n", deltas)


# --------------------------------------------------------------------------------------------------
# Running a test
# --------------------------------------------------------------------------------------------------

def run_test(test: str, generator, run, accuracy_log: str | Path | None = None, *, batch_size: int | None = None,
             scorer: Scorer | None = None, show_progress: bool = False) -> ComplianceResult:
    """Run one audit of ``run`` (a harness.BenchmarkRun with a performance result) and verify it."""
    from .data import read_sample_set
    from .harness import USER_CONF, run_loadgen
    from .rounds import get_round

    check_test(test)
    reference = _reference_summary(run)
    if test == "TEST01" and (accuracy_log is None or not Path(accuracy_log).is_file()):
        raise DataError(f"TEST01 compares with the accuracy run's log, and {accuracy_log} does not exist",
                        "run the accuracy mode first (02_baseline runs it; or 05_accuracy)")
    directory = new_test_dir(run.run_dir, test)
    audit = write_audit_config(test, directory)
    config = run.record.get("config", {})
    result = run_loadgen(generator, read_sample_set(run.run_dir), "performance", run.run_dir,
                         batch_size or int(config.get("batch_size", 1)), get_round(run.record["round"]),
                         Path(run.run_dir) / USER_CONF, audit_config=audit, show_progress=show_progress,
                         log_name=str(directory.relative_to(run.run_dir) / LOGS_DIR))
    outcome = verify_test(test, directory, reference, accuracy_log, scorer, get_round(run.record["round"]))
    outcome.details["loadgen"] = {"valid": result.valid, "samples": result.samples, "seeds": result.seeds,
                                  "errors": result.errors, "wall_seconds": result.wall_seconds}
    _save(outcome)
    return outcome


def verify_test(test: str, directory: Path, reference_summary: Path, accuracy_log: str | Path | None,
                scorer: Scorer | None, rnd) -> ComplianceResult:
    """Write verify_performance.txt (and for TEST01 verify_accuracy.txt and the fallback files) for a finished run."""
    logs = Path(directory) / LOGS_DIR
    perf_pass, perf_text = verify_performance(reference_summary, logs / SUMMARY_LOG, test)
    (directory / VERIFY_PERFORMANCE).write_text(perf_text)
    outcome = ComplianceResult(test, str(directory), read_summary(reference_summary)["score"],
                               read_summary(logs / SUMMARY_LOG)["score"], perf_pass,
                               details={"reference_summary": str(reference_summary),
                                        "written": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    if test == "TEST01":
        acc_pass, acc_text, counts = verify_accuracy(accuracy_log, logs / ACCURACY_LOG)
        (directory / VERIFY_ACCURACY).write_text(acc_text)
        outcome.accuracy_pass = acc_pass
        outcome.details.update(accuracy_log=str(accuracy_log), counts=counts)
        if not acc_pass:
            _fallback(outcome, accuracy_log, logs / ACCURACY_LOG, scorer, rnd.accuracy_quoted)
    return outcome


def _fallback(outcome: ComplianceResult, reference_log, test_log: Path, scorer: Scorer | None, quoted: bool) -> None:
    """TEST01's second chance: the metric deltas, written as baseline/compliance_accuracy.txt."""
    directory = Path(outcome.directory)
    if scorer is None:
        outcome.details["fallback"] = "not run: no metric models were given (pass a scorer, e.g. metric_scorer())"
        return
    passed, baseline, compliance, deltas = accuracy_fallback(reference_log, test_log, scorer, quoted)
    (directory / BASELINE_ACCURACY).write_text(baseline)
    (directory / COMPLIANCE_ACCURACY).write_text(compliance)
    outcome.fallback_pass = passed
    outcome.details["fallback"] = {"delta_percent": deltas, "limits_percent": ACCURACY_DELTA_PERCENT}


def _reference_summary(run) -> Path:
    perf = (run.record.get("results") or {}).get("performance")
    path = Path(perf["log_dir"]) / SUMMARY_LOG if perf else None
    if path is None or not path.is_file():
        raise DataError(f"{run.run_dir} has no performance result to audit",
                        "run the performance mode first (02_baseline), then the compliance tests")
    return path


def _save(outcome: ComplianceResult) -> None:
    write_json(Path(outcome.directory) / RESULT_FILE, outcome.as_dict())


def run_compliance(generator, run, accuracy_log: str | Path | None, tests: Sequence[str] = TESTS, *,
                   scorer: Scorer | None = None, show_progress: bool = False) -> list[ComplianceResult]:
    """All audits of ``run``, in order; each into its own new directory."""
    return [run_test(test, generator, run, accuracy_log, scorer=scorer, show_progress=show_progress)
            for test in tests]


def generator_for_run(run):
    """The pipeline the run was made with (same source, dtype, device, options), for its audits."""
    from .pipeline import make_runner

    config = run.record.get("config", {})
    ranks = (run.record.get("distributed") or {}).get("ranks") or []
    if len(ranks) > 1:
        raise KitError(f"{run.run_dir} ran on {len(ranks)} GPUs through sccsdxl.distributed; the kit runs the "
                       "compliance tests with one model copy, whose speed would not match",
                       "submit open without compliance tests, or run TEST01/TEST04 by hand with the audit.config "
                       "files of sccsdxl.compliance.AUDIT_CONFIGS")
    try:
        return make_runner(config.get("model_source", "hf"), config.get("dtype", "fp16"), config.get("device", "auto"),
                           config.get("model_path") or None,
                           cache_dir=str(Path(config.get("output_dir", "output")) / "cache"),
                           optimizations=config.get("optimizations", ""))
    except KitError:
        raise
    except Exception as exc:  # noqa: BLE001 - a model that will not load is the user's to fix
        raise KitError(f"cannot load the model of {run.run_dir} for the compliance runs ({type(exc).__name__}: {exc})",
                       "run the compliance tests on the machine that made the run, or set run_compliance False"
                       ) from None


def metric_scorer(run_dir: str | Path, metric_models: str, data_dir: str | Path, output_dir: str | Path,
                  device: str = "auto") -> Scorer:
    """CLIP (against the run's own captions) and FID, as 05_accuracy computes them; models load on first use."""
    from . import accuracy as A
    from .data import read_sample_set

    samples = read_sample_set(Path(run_dir))
    loaded: dict[str, Any] = {}

    def score(images: list[tuple[int, np.ndarray]]) -> tuple[float, float]:
        from PIL import Image

        if "models" not in loaded:
            files = A.metric_files_for(metric_models, data_dir, output_dir)
            loaded["models"] = A.load_metric_models(files, A.resolve_metrics_device(device))
        models = loaded["models"]
        pils = [Image.fromarray(image).convert("RGB") for _, image in images]
        clip = [models.clip.scores([pil], [samples.caption(idx)])[0] for (idx, _), pil in zip(images, pils)]
        features = np.concatenate([A.inception_features(models.inception, [pil], models.device) for pil in pils])
        mu, sigma = A.feature_statistics(features)
        return float(np.mean(clip)), A.frechet_distance(models.mu_ref, models.sigma_ref, mu, sigma)

    return score


def results_table(results: Sequence[ComplianceResult]):
    """One row per audit: scores, the three checks, the verdict, where the files are."""
    import pandas as pd

    def mark(value: bool | None) -> str:
        return {True: "PASS", False: "FAIL", None: "-"}[value]

    rows = [{"test": r.test, "reference samples/s": r.reference_samples_per_second, "samples/s": r.samples_per_second,
             "performance": mark(r.performance_pass), "identical responses": mark(r.accuracy_pass),
             "CLIP/FID deltas": mark(r.fallback_pass), "verdict": "PASS" if r.passed else "FAIL",
             "directory": Path(r.directory).name} for r in results]
    return pd.DataFrame(rows).set_index("test") if rows else pd.DataFrame()
