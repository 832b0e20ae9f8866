"""MLPerf Inference rounds: the per-round settings the submission checker enforces, in one table.

Seeds: the checker rejects a result whose loadgen seeds are not the round's. loadgen's built-in
mlperf.conf carries the seeds of the round it was released for; for any other round the harness
writes the round's seeds onto ``TestSettings`` after loading the config (``mlperf-sdxl.md`` §6.2).
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import ParameterError


@dataclass(frozen=True)
class Round:
    name: str
    qsl_rng_seed: int
    sample_index_rng_seed: int
    schedule_rng_seed: int
    layout: str  # submission tree: "v4" (code/, compliance/<sys>/) or "v6" (src/, TEST0x inside the scenario dir)
    accuracy_quoted: bool  # accuracy.txt numbers as quoted strings (checker regex since b6f5a343) or bare floats
    dataset_size_check: bool  # checker demands qsl_reported_total_count == 5000 in the accuracy run

    @property
    def seeds(self) -> dict[str, int]:
        return {"qsl_rng_seed": self.qsl_rng_seed, "sample_index_rng_seed": self.sample_index_rng_seed,
                "schedule_rng_seed": self.schedule_rng_seed}


ROUNDS: dict[str, Round] = {r.name: r for r in [
    Round("v4.0", 13281865557512327830, 198141574272810017, 7575108116881280410, "v4", False, False),
    Round("v4.1", 3066443479025735752, 10688027786191513374, 14962580496156340209, "v4", False, False),
    Round("v5.0", 6023615788873153749, 15036839855038426416, 9933818062894767841, "v4", True, True),
    Round("v5.1", 1780908523862526354, 14771362308971278857, 18209322760996052031, "v4", True, True),
    Round("v6.0", 2465351861681999779, 14276810075590677512, 3936089224930324775, "v6", True, True),
    Round("v6.1", 2085463073848966840, 2747215439041700203, 16159082839903944936, "v6", True, True),
]}

DEFAULT_ROUND = "v4.1"  # the round SCC24 ran
CURRENT = "current"  # the round whose seeds the installed loadgen carries


def round_of_seeds(seeds: dict[str, int]) -> Round | None:
    """The round whose seeds these are, if any."""
    return next((r for r in ROUNDS.values() if r.seeds == seeds), None)


def installed_loadgen_round() -> Round:
    """The round of the installed loadgen, read from the seeds of its built-in mlperf.conf."""
    import tempfile
    from pathlib import Path

    import mlperf_loadgen as lg

    from .constants import MODEL_NAME, SCENARIO

    settings = lg.TestSettings()
    settings.scenario = lg.TestScenario.Offline
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "user.conf"
        conf.write_text(f"{MODEL_NAME}.{SCENARIO}.target_qps = 1\n")
        settings.FromConfig(str(conf), MODEL_NAME, SCENARIO)
    seeds = {k: int(getattr(settings, k)) for k in ("qsl_rng_seed", "sample_index_rng_seed", "schedule_rng_seed")}
    found = round_of_seeds(seeds)
    if found is None:
        raise ParameterError(f"the installed mlcommons-loadgen carries seeds {seeds} that match no round in sccsdxl.rounds",
                             f"name a round explicitly (-p mlperf_round {DEFAULT_ROUND}) or add the new round to ROUNDS")
    return found


def get_round(name: str) -> Round:
    """Resolve a round name ('v4.1', ..., or 'current')."""
    if name == CURRENT:
        return installed_loadgen_round()
    if name not in ROUNDS:
        raise ParameterError(f"unknown MLPerf round {name!r}",
                             f"use one of {', '.join(ROUNDS)} or {CURRENT!r} (e.g. -p mlperf_round {DEFAULT_ROUND})")
    return ROUNDS[name]


def compliance_ids(round_name: str) -> list[int]:
    """The 10 sample ids whose images the checker requires in accuracy/images/ for this round."""
    from .data import compliance_id_table

    table = compliance_id_table()
    checker = table[table["source"].str.contains("REQUIRED_ACC_BENCHMARK") & (table["version_or_commit"] == round_name)]
    rows = checker if len(checker) else table[table["version_or_commit"] == round_name]
    if not len(rows):
        raise ParameterError(f"no compliance-image ids are known for round {round_name!r}",
                             f"use one of {', '.join(ROUNDS)}")
    return [int(x) for x in str(rows["ids"].iloc[-1]).split()]
