"""Command line for batch jobs: ``sccsdxl run ...`` is the same loadgen run 02_baseline makes."""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from .errors import KitError
from .harness import MODES, RunConfig, results_table, run_benchmark


def _run_parser(sub) -> None:
    parser = sub.add_parser("run", help="one benchmark run (performance and/or accuracy) into a new run directory")
    defaults = RunConfig()
    for field in fields(RunConfig):
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(flag, type=type(getattr(defaults, field.name)), default=getattr(defaults, field.name),
                            help=f"default: {getattr(defaults, field.name)!r}")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of performance,accuracy")
    parser.add_argument("--label", default=None, help="suffix of the run directory name")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sccsdxl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    args = parser.parse_args(argv)
    try:
        config = RunConfig(**{f.name: getattr(args, f.name) for f in fields(RunConfig)})
        modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
        run = run_benchmark(config, modes=modes, show_progress=not args.no_progress, label=args.label)
    except KitError as exc:
        print(f"sccsdxl: {exc.message}", file=sys.stderr)
        return 2
    print(results_table(run).to_string())
    print(f"run directory: {run.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
