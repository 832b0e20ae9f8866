"""Reading accuracy-mode results: the hex-encoded images loadgen logs in mlperf_log_accuracy.json.

The log holds every response as hex (6.3 MB per 1024x1024 image, 31.5 GB for 5000), so it is streamed
with ijson one entry at a time; the first entry of each ``qsl_idx`` wins, as in the MLPerf accuracy script.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .errors import DataError

ACCURACY_LOG = "mlperf_log_accuracy.json"


def decode_image(hex_data: str, shape: tuple[int, int, int] | None = None) -> np.ndarray:
    """uint8 HWC image from loadgen's hex string; square RGB assumed when no shape is given."""
    raw = np.frombuffer(bytes.fromhex(hex_data), dtype=np.uint8)
    if shape is None:
        side = int(round((raw.size / 3) ** 0.5))
        shape = (side, side, 3)
    if raw.size != shape[0] * shape[1] * shape[2]:
        raise DataError(f"an accuracy-log entry holds {raw.size} bytes, not an image of shape {shape}",
                        "the log is from another model or image size; re-run the accuracy run")
    return raw.reshape(shape)


def iter_accuracy_log(path: str | Path, shape: tuple[int, int, int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(qsl_idx, image) per unique sample, in log order, streamed; repeated qsl_idx entries are skipped."""
    import ijson

    path = Path(path)
    if not path.is_file():
        raise DataError(f"accuracy log {path} not found", "run the accuracy-mode run first (02_baseline or 05_accuracy)")
    seen: set[int] = set()
    try:
        with open(path, "rb") as fh:
            for entry in ijson.items(fh, "item"):
                idx = int(entry["qsl_idx"])
                if idx in seen:
                    continue
                seen.add(idx)
                yield idx, decode_image(entry["data"], shape)
    except (ijson.JSONError, KeyError, ValueError) as exc:
        raise DataError(f"accuracy log {path} is truncated or malformed ({type(exc).__name__}: {exc})",
                        "re-run the accuracy run into a new run directory; a killed run leaves a partial log") from None
