"""Markdown table of the run.json files under a runs directory (one row per run), for BENCHMARKS.md."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def row(record: dict) -> str:
    cfg, perf = record["config"], record["results"].get("performance", {})
    machine, versions = record["machine"], record["versions"]
    gpus = machine.get("gpus") or [{"name": "CPU"}]
    peak = perf.get("peak_gpu_memory_bytes")
    cells = [
        cfg["variant"], str(record["samples"]), cfg["model_source"], cfg["dtype"], str(cfg["batch_size"]),
        f"{perf.get('samples_per_second', float('nan')):.4g}" if perf else "-",
        {True: "VALID", False: "INVALID"}.get(perf.get("valid"), "-"),
        f"{peak / 2**30:.1f}" if peak else "-",
        f"{len(gpus)}x {gpus[0]['name']}", record["created"][:10],
        f"torch {versions['torch']}, diffusers {versions['diffusers']}, loadgen {versions['mlcommons-loadgen']}",
    ]
    return "| " + " | ".join(cells) + " |"


def main(root: str) -> None:
    records = sorted((json.loads(p.read_text()) for p in Path(root).glob("*/run.json")), key=lambda r: r["created"])
    print("| variant | samples | model | dtype | batch | samples/s | result | peak GiB | GPU | date | versions |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for record in records:
        print(row(record))


if __name__ == "__main__":
    main(sys.argv[1])
