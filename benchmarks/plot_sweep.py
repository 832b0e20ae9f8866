"""Plot sweep points gathered from several calls (one points.jsonl-style file) with 03's own plot.

    python3 benchmarks/plot_sweep.py POINTS.jsonl OUT.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")

from sccsdxl.sweep import SweepPoint, plot_sweep  # noqa: E402

points = [SweepPoint.from_dict(json.loads(line)) for line in open(sys.argv[1]) if line.strip()]
plot_sweep(points).savefig(sys.argv[2], dpi=110)
print(f"{len(points)} points -> {sys.argv[2]}")
