"""The table BENCHMARKS.md shows for an A/B through loadgen (benchmarks/ab_h200.sh), from its OUT_DIR/NAME.jsonl rows:
one line per process in the order run, then the mean over all runs of each set of switches and added options.
  python3 benchmarks/summarize_ab.py NAME:RUN_DIR:SWITCHES:REPEATS:SECONDS[:OPTIONS] [...] --out OUT_DIR
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def rows_of(path: Path) -> list[dict]:
    """A process's rows; none if it wrote none (stopped by its limit before its first run, or failed)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def label(switches: str, options: str) -> str:
    """A process's switches and the options it added to CONFIG's, as the tables show them."""
    return ", ".join(part for part in (switches, f"+{options}" if options else "") if part) or "none"


def process_line(name: str, switches: str, rows: list[dict]) -> str:
    if not rows:
        return f"| {name} | {switches} | no run finished (see {name}.txt) | | | | |"
    power = [row["gpu_power"] or {} for row in rows]
    clocks = [p["gpus"][0].get("mean_sm_mhz") for p in power if p.get("gpus")]
    peak = max(row["peak_gpu_bytes"] or 0 for row in rows) / 2**30
    speeds = ", ".join(f"{row['samples_per_second']:.3f}" for row in rows)
    joules = ", ".join(f"{p['joules_per_sample']:.1f}" if p.get("joules_per_sample") else "-" for p in power)
    valid = "" if all(row["valid"] for row in rows) else " not every run VALID |"
    return (f"| {name} | {switches} | {speeds} | {joules} | {', '.join(str(c) for c in clocks)} | "
            f"{rows[0]['warmup_seconds']:.1f} | {peak:.2f} |{valid}")


def main(argv: list[str]) -> None:
    if "--out" not in argv or argv.index("--out") + 1 >= len(argv):
        sys.exit("usage: summarize_ab.py NAME:RUN_DIR:SWITCHES:REPEATS:SECONDS[:OPTIONS] [...] --out OUT_DIR")
    at = argv.index("--out")
    out, specs = Path(argv[at + 1]), argv[:at] + argv[at + 2:]
    by_switches: dict[str, list[float]] = {}
    print("| process | switches, +options | runs, samples/s | J per sample | mean SM MHz | first warm-up s | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for spec in specs:
        name, _, switches, *rest = spec.split(":")
        what = label(switches, rest[2] if len(rest) > 2 else "")
        rows = rows_of(out / f"{name}.jsonl")
        print(process_line(name, what, rows))
        by_switches.setdefault(what, []).extend(r["samples_per_second"] for r in rows)
    print("\n| switches, +options | runs | mean samples/s | range |\n|---|---|---|---|")
    for what, speeds in by_switches.items():
        if speeds:
            print(f"| {what} | {len(speeds)} | {statistics.mean(speeds):.3f} | "
                  f"{min(speeds):.3f}-{max(speeds):.3f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
