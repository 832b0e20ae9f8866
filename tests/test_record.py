import json

import pytest

from sccsdxl.errors import OutputError
from sccsdxl.record import read_record, write_record


def test_record_is_written_and_an_earlier_one_is_archived(tmp_path):
    first = write_record(tmp_path, "02_baseline", {"samples_per_second": 1.0})
    write_record(tmp_path, "02_baseline", {"samples_per_second": 2.0})
    assert read_record(tmp_path, "02_baseline")["samples_per_second"] == 2.0
    archived = list((tmp_path / "records").glob("02_baseline-*.json"))
    assert len(archived) == 1 and json.loads(archived[0].read_text())["samples_per_second"] == 1.0
    assert first == tmp_path / "02_baseline.json"


def test_unwritable_output_dir_is_reported(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot write the record"):
        write_record(blocker / "sub", "02_baseline", {})


def test_missing_record_names_the_notebook(tmp_path):
    with pytest.raises(OutputError, match="run notebooks/02_baseline.ipynb"):
        read_record(tmp_path, "02_baseline")


def test_archiving_never_overwrites_an_earlier_archive(tmp_path):
    import os

    from sccsdxl.record import archive_existing

    path = tmp_path / "quantized.yaml"
    kept = []
    for text in ("first", "second", "third"):
        path.write_text(text)
        os.utime(path, (1_700_000_000, 1_700_000_000))  # same mtime: same stamp each time
        kept.append(archive_existing(path))
    assert not path.exists() and len(set(kept)) == 3
    assert sorted(p.read_text() for p in kept) == ["first", "second", "third"]
    assert archive_existing(path) is None


def test_unique_file_never_returns_an_existing_file(tmp_path):
    from sccsdxl.record import unique_file

    first = unique_file(tmp_path / "logs", "warm-start-x", ".log", "a log")
    first.write_text("kept")
    second = unique_file(tmp_path / "logs", "warm-start-x", ".log", "a log")
    assert first.name == "warm-start-x.log" and second.name == "warm-start-x-2.log"
    assert first.read_text() == "kept" and second.read_text() == ""
