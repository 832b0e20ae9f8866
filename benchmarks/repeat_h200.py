"""Repeated loadgen performance runs of a few configurations on one GPU: the spread of one VM, and an A/B within it.

Each configuration is built once (one cold compile), then its loadgen Offline performance run (the harness that
02 and 04 use, `base`: 50 samples) is repeated, each run in a new run directory; rows go to RESULTS.jsonl as they
finish and a markdown table (every run, mean, range) is printed. Between VMs of one kind the spread was 2-4 %
(BENCHMARKS.md), more than the gains being compared, so an A/B is only read within one VM. Run from the repo root:
  python3 benchmarks/repeat_h200.py RESULTS.jsonl OUTPUT_DIR BATCH REPEATS DTYPE:OPTIONS [DTYPE:OPTIONS ...]
SOURCE (env, default synthetic) and DEVICE (default cuda): SOURCE=tiny DEVICE=cpu is a smoke test.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, ".")
from sccsdxl.harness import RunConfig, run_benchmark  # noqa: E402
from sccsdxl.pipeline import free_gpu_memory, make_runner  # noqa: E402
from sccsdxl.quant import parse_config  # noqa: E402


def runs_of(spec: str, output_dir: str, batch: int, repeats: int, results: Path) -> list[float]:
    """Build one configuration, warm it, then time ``repeats`` performance runs; returns their samples/s."""
    config = parse_config(spec)
    base = RunConfig(variant="base", model_source=os.environ.get("SOURCE", "synthetic"), dtype=config.dtype,
                     device=os.environ.get("DEVICE", "cuda"), batch_size=batch, output_dir=output_dir,
                     optimizations=str(config.optimizations))
    started = time.perf_counter()
    runner = make_runner(base.model_source, base.dtype, base.device, cache_dir=str(Path(output_dir) / "cache"),
                         optimizations=base.optimizations)
    speeds = []
    for repeat in range(repeats):
        # the first run's warm-up batch compiles; the later ones warm up too, as every loadgen run of the kit does
        run = run_benchmark(base, modes=("performance",), generator=runner, show_progress=False,
                            label=f"repeat{repeat}-bs{batch}")
        result = run.result("performance")
        speeds.append(result["samples_per_second"])
        row = {"config": spec, "repeat": repeat, "batch_size": batch, "samples_per_second": speeds[-1],
               "valid": result.get("valid"),
               "switches": {k: v for k, v in os.environ.items() if k.startswith("SCCSDXL_")}, "peak_gpu_bytes": result.get("peak_gpu_memory_bytes"),
               "gpu_power": result.get("gpu_power"),
               "warmup_seconds": run.record["warmup_seconds"],
               "since_build_s": round(time.perf_counter() - started, 1), "run_dir": str(run.run_dir)}
        with open(results, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    del runner
    free_gpu_memory()
    return speeds


def main() -> None:
    results, output_dir, batch, repeats, specs = (Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]),
                                                  int(sys.argv[4]), sys.argv[5:])
    table = {spec: runs_of(spec, output_dir, batch, repeats, results) for spec in specs}
    print("\n| configuration | runs, samples/s | mean | range |\n|---|---|---|---|")
    for spec, speeds in table.items():
        spread = (max(speeds) - min(speeds)) / statistics.mean(speeds) * 100
        print(f"| `{spec}` | {', '.join(f'{s:.3f}' for s in speeds)} | {statistics.mean(speeds):.3f} | "
              f"{min(speeds):.3f}-{max(speeds):.3f} ({spread:.1f} %) |")


if __name__ == "__main__":
    main()
