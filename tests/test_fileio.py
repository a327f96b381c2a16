"""Atomic writes: a failed write leaves the old file whole and no temporary file behind."""

import json
import os

import pytest

from edgetts import fileio
from edgetts.outputs import OutputError, write_text


def test_json_is_written_whole_and_replaces_the_old_file(tmp_path):
    path = tmp_path / "summary.json"
    fileio.write_json_atomic(path, {"b": 1, "a": [1, 2]})
    fileio.write_json_atomic(path, {"c": "é"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"c": "é"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    fileio.write_json_atomic(path, {"old": True})

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError):
        fileio.write_json_atomic(path, {"new": True})
    with pytest.raises(OutputError, match=r"^cannot write .*No space left on device$"):
        write_text(path, "new")
    assert json.loads(path.read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_a_directory_in_the_way_is_an_error_and_stays(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(OSError):
        fileio.write_json_atomic(tmp_path / "out", {})
    assert (tmp_path / "out").is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
