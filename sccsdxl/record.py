"""The machine-readable record each notebook writes last: ``<output_dir>/<notebook stem>.json``."""
from __future__ import annotations

import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import OutputError

RECORDS_ARCHIVE = "records"


def unique_dir(root: Path, name: str, what: str, first_suffix: int = 1) -> Path:
    """Create ``root/name`` (or ``name-2``, ``name-3``, ... if taken): a fresh directory, never a reused one."""
    return _create_unique(root, name, "", what, first_suffix, Path.mkdir)


def unique_file(root: Path, name: str, suffix: str, what: str) -> Path:
    """Create an empty ``root/name<suffix>`` (or ``name-2<suffix>``, ... if taken): never an earlier file."""
    return _create_unique(root, name, suffix, what, 1, Path.touch)


def _create_unique(root: Path, name: str, suffix: str, what: str, first_suffix: int, create) -> Path:
    """The first of ``name``, ``name-<first_suffix + 1>``, ... that ``create`` (which fails on an existing path)
    makes; the check and the creation are one step, so two processes never get the same path."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        for n in range(first_suffix, 1000):
            path = root / f"{name if n == first_suffix else f'{name}-{n}'}{suffix}"
            try:
                create(path, exist_ok=False)
                return path
            except FileExistsError:
                continue
    except OSError as exc:
        raise OutputError(f"cannot create {what} in {root}: {exc.strerror}",
                          "pass a writable directory with -p output_dir <dir>") from None
    raise OutputError(f"{root} already holds 999 of {what} named {name}", "use another output_dir or remove old ones")


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write through a uniquely named temporary file beside ``path``: a reader (or another process writing the
    same file at the same time, one per GPU) never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")  # plain file mode (umask)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_json(path: str | Path, payload: dict) -> Path:
    """Write JSON atomically (see write_text_atomic)."""
    return write_text_atomic(path, json.dumps(payload, indent=2, default=str))


def archive_existing(path: Path, archive_dir: Path | None = None) -> Path | None:
    """Move an existing file to ``<archive_dir>/<stem>-<its mtime>[-n]<suffix>`` (never over another); None if absent."""
    if not path.exists():
        return None
    archive_dir = archive_dir or path.parent
    archive_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y%m%d-%H%M%S")
    target = next(t for n in range(100_000)
                  if not (t := archive_dir / f"{path.stem}-{stamp}{f'-{n}' if n else ''}{path.suffix}").exists())
    path.replace(target)
    return target


def write_record(output_dir: str | Path, notebook: str, payload: dict[str, Any]) -> Path:
    """Write the notebook's record; an earlier record of the same notebook is moved to records/, never lost."""
    out = Path(output_dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{notebook}.json"
        archive_existing(path, out / RECORDS_ARCHIVE)
        record = {"notebook": notebook, "written": datetime.now(timezone.utc).isoformat(timespec="seconds"), **payload}
        return write_json(path, record)
    except OSError as exc:
        raise OutputError(f"cannot write the record in {out}: {exc.strerror}",
                          "pass a writable directory with -p output_dir <dir>") from None


def read_record(output_dir: str | Path, notebook: str) -> dict[str, Any]:
    path = Path(output_dir).expanduser() / f"{notebook}.json"
    if not path.is_file():
        raise OutputError(f"{path} not found", f"run notebooks/{notebook}.ipynb with the same output_dir first")
    return json.loads(path.read_text())
