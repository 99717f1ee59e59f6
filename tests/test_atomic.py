"""ctssl.atomic: whole files or none, temp files cleaned, one-line errors for full or read-only disks."""
from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from ctssl import atomic
from ctssl.atomic import OutputError, check_output_dir, open_atomically, remove_stale_temps, write_text


def _no_temps(directory):
    return [p.name for p in directory.iterdir() if atomic.TEMP_MARK in p.name] == []


def test_a_failed_write_keeps_the_previous_file_and_removes_its_temp(tmp_path):
    target = tmp_path / "metrics.json"
    write_text(target, "old")
    with pytest.raises(RuntimeError):
        with open_atomically(target) as f:
            f.write("half of the new")
            raise RuntimeError("crash while writing")
    assert target.read_text() == "old" and _no_temps(tmp_path)


def test_a_full_disk_is_one_line_that_names_the_file(tmp_path):
    target = tmp_path / "checkpoint_last.pt"
    write_text(target, "old")
    with pytest.raises(OutputError) as info:
        with atomic.replace_atomically(target) as tmp:
            tmp.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
    message = str(info.value)
    assert "\n" not in message and str(target) in message and "no space left" in message
    assert "previous file is unchanged" in message
    assert target.read_text() == "old" and _no_temps(tmp_path)


def test_stale_temps_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead = tmp_path / f".checkpoint_last.pt{atomic.TEMP_MARK}{proc.pid}"
    live = tmp_path / f".log.jsonl{atomic.TEMP_MARK}{os.getppid()}"
    nested = tmp_path / "shards" / "p" / f".s.npy{atomic.TEMP_MARK}{proc.pid}"
    nested.parent.mkdir(parents=True)
    for p in (dead, live, nested):
        p.write_bytes(b"x")
    (tmp_path / "keep.tmp-1").write_bytes(b"not hidden: not ours")
    assert remove_stale_temps(tmp_path) == 1
    assert not dead.exists() and live.exists() and nested.exists() and (tmp_path / "keep.tmp-1").exists()
    assert remove_stale_temps(tmp_path, recursive=True) == 1 and not nested.exists()


def test_output_dir_that_is_a_file_under_a_file_or_read_only(tmp_path, monkeypatch):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    with pytest.raises(OutputError, match="is a file, not a directory"):
        check_output_dir(a_file, "--out")
    with pytest.raises(OutputError, match=f"cannot be created: {a_file} is a file"):
        check_output_dir(a_file / "run", "--out")
    assert check_output_dir(tmp_path / "new" / "run") == tmp_path / "new" / "run"
    assert not (tmp_path / "new").exists()  # nothing created
    monkeypatch.setattr(atomic.os, "access", lambda path, mode: False)  # as on a read-only mount
    with pytest.raises(OutputError, match="not writable"):
        check_output_dir(tmp_path / "run", "--out")
