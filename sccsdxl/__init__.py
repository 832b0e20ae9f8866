"""sccsdxl: the MLPerf Inference SDXL Offline benchmark for Student Cluster Competition teams."""
from __future__ import annotations

__version__ = "0.1.0"
