"""Atomic writes and torn metrics lines."""

import json

import pytest

from dassdp._util.io import atomic_write_json, atomic_write_text
from dassdp.engine.metrics import MetricsWriter, read_metrics


def test_atomic_write_leaves_no_temp_and_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "old")
    import dassdp._util.io as io

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(io.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_json(path, {"new": 1})
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_torn_last_metrics_line_is_dropped_on_resume(tmp_path):
    rows = [{"epoch": 0, "x": 1.0}, {"epoch": 1, "x": 2.0}]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"epoch": 2, "x":'  # killed mid-append
    (tmp_path / "metrics.jsonl").write_text(text)
    assert read_metrics(tmp_path) == rows
    MetricsWriter(tmp_path, tensorboard=False, start_epoch=1).write({"epoch": 1, "x": 3.0})
    assert read_metrics(tmp_path) == [rows[0], {"epoch": 1, "x": 3.0}]
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 0}\nnot json\n{"epoch": 1}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_metrics(tmp_path)


def test_atomic_writes_honour_the_umask(tmp_path):
    """Regression: mkstemp made every atomically written file 0600, whatever the umask."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        os.umask(0o027)
        atomic_write_json(tmp_path / "b.json", {"x": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o640
