"""ctssl-prepare: bad input never stops the run, every skip is reported, reruns resume."""

from __future__ import annotations

import csv
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid

from ctssl.atomic import TEMP_MARK
from ctssl.data.dicom import read_slice_hu, scan_dicom_tree
from ctssl.data.prepare import main, prepare_store
from ctssl.data.store import INDEX_FILE, SKIPPED_FILE, SliceStore

from .helpers import (
    copy_testdata,
    decoder_available,
    read,
    series_dirs,
    write_resized_slice,
    write_truncated,
    write_with_transfer_syntax,
    write_without_pixels,
)


def skipped_rows(out: Path) -> dict[str, str]:
    with open(out / SKIPPED_FILE, newline="") as f:
        rows = list(csv.DictReader(f))
    return {Path(r["path"]).name: r["reason"] for r in rows}


def index_lines(out: Path) -> list[str]:
    return [ln for ln in (out / INDEX_FILE).read_text().splitlines() if ln.strip()]


def finished_pid() -> int:
    """The process id of a process that has exited (a killed writer's)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def shard_mtimes(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in (out / "shards").rglob("*.npy")}


def test_store_holds_the_same_hu_as_the_reader(phantom_tree, tmp_path):
    out = tmp_path / "store"
    assert main([str(phantom_tree), str(out), "--workers", "1", "--no-progress"]) == 0
    store = SliceStore(out)
    series, _ = scan_dicom_tree(phantom_tree)
    assert len(store) == sum(len(s.slices) for s in series) == 24
    by_source = {r.source: i for i, r in enumerate(store.records)}
    for s in series:
        for h in s.slices:
            i = by_source[os.path.relpath(h.path, phantom_tree)]
            expected, _ = read_slice_hu(h.path)
            got = store.read_hu(i)
            assert got.dtype == np.int16
            np.testing.assert_array_equal(got, expected.astype(np.int16))
            rec = store.record(i)
            assert rec.position == pytest.approx(h.position)
            assert rec.spacing == pytest.approx(h.spacing)
            assert rec.patient == s.patient and rec.series == s.series
    assert (out / SKIPPED_FILE).read_text().strip() == "path,reason"


def test_bad_files_are_reported_and_the_rest_is_prepared(phantom_tree, tmp_path, capsys):
    first, second, third = series_dirs(phantom_tree)
    good = sorted(first.glob("*.dcm"))
    write_truncated(good[0], first / "truncated.dcm")
    good[0].unlink()  # the truncated copy replaces a slice
    write_without_pixels(good[1], first / "nopixels.dcm")
    write_resized_slice(good[2], first / "small.dcm", 32)
    write_with_transfer_syntax(good[3], second / "weird_syntax.dcm", "1.2.3.4.5.6.7")
    write_with_transfer_syntax(good[4], second / "jpegls.dcm", "1.2.840.10008.1.2.4.80", encapsulate=True)
    copy_testdata("MR_small.dcm", third / "mr.dcm")
    (third / "annotations.xml").write_text("<LidcReadMessage/>")
    (phantom_tree / "empty.dcm").write_bytes(b"")

    out = tmp_path / "store"
    assert main([str(phantom_tree), str(out), "--workers", "1", "--no-progress"]) == 0
    reasons = skipped_rows(out)
    assert reasons["truncated.dcm"].startswith("truncated pixel data")
    assert reasons["nopixels.dcm"].startswith("no pixel data")
    assert reasons["small.dcm"] == "slice size 32x32 differs from the series' 48x48"
    assert reasons["weird_syntax.dcm"].startswith("unsupported transfer syntax 1.2.3.4.5.6.7")
    assert "JPEG-LS" in reasons["jpegls.dcm"]
    if not decoder_available("1.2.840.10008.1.2.4.80"):
        assert "pip install" in reasons["jpegls.dcm"]
    assert reasons["mr.dcm"] == "modality MR, not CT"
    assert reasons["annotations.xml"] == "not a DICOM file"
    assert reasons["empty.dcm"] in ("not a DICOM file",) or reasons["empty.dcm"].startswith("unreadable")
    assert len(reasons) == 8

    store = SliceStore(out)
    assert len(store.series) == 3
    assert len(store) == 24 - 1  # only the truncated slice is missing; the rest is intact
    counts = sorted(len(e["positions"]) for e in store.series)
    assert counts == [7, 8, 8]
    summary = capsys.readouterr().out
    assert "3 series written (23 slices)" in summary and "8 files skipped" in summary


def test_min_files_skips_short_series(phantom_tree, tmp_path):
    first = series_dirs(phantom_tree)[0]
    for p in sorted(first.glob("*.dcm"))[:5]:
        p.unlink()
    out = tmp_path / "store"
    report = prepare_store(phantom_tree, out, min_files=4, progress=False)
    assert report.series_written == 2
    reasons = list(skipped_rows(out).values())
    assert len(reasons) == 3 and all(r == "series has 3 CT files, fewer than min_files=4" for r in reasons)


def test_user_errors_exit_with_code_2(tmp_path, capsys):
    assert main([str(tmp_path / "missing"), str(tmp_path / "out"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), str(tmp_path / "out"), "--no-progress"]) == 2
    assert "no files found" in capsys.readouterr().err
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "readme.txt").write_text("hello")
    assert main([str(tmp_path / "text"), str(tmp_path / "out"), "--no-progress"]) == 2
    assert "no DICOM files found" in capsys.readouterr().err
    (tmp_path / "mr").mkdir()
    copy_testdata("MR_small.dcm", tmp_path / "mr" / "mr.dcm")
    assert main([str(tmp_path / "mr"), str(tmp_path / "out2"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no CT series found" in err and "skipped.csv" in err
    assert "modality MR, not CT" in (tmp_path / "out2" / SKIPPED_FILE).read_text()


def test_rerun_skips_finished_series(phantom_tree, tmp_path):
    out = tmp_path / "store"
    first = prepare_store(phantom_tree, out, progress=False)
    assert (first.series_written, first.series_reused) == (3, 0)
    before = shard_mtimes(out)
    lines_before = index_lines(out)
    second = prepare_store(phantom_tree, out, progress=False)
    assert (second.series_written, second.series_reused) == (0, 3)
    assert shard_mtimes(out) == before
    assert index_lines(out) == lines_before


def test_interrupted_series_is_redone(phantom_tree, tmp_path):
    out = tmp_path / "store"
    prepare_store(phantom_tree, out, progress=False)
    lines = index_lines(out)
    lost = json.loads(lines[-1])
    # simulate a crash while that series was being written: no index line, a leftover temp file,
    # and (worst case) a stale shard
    (out / INDEX_FILE).write_text("\n".join(lines[:-1]) + "\n")
    shard = out / lost["shard"]
    tmp = shard.with_name(f".{shard.name}{TEMP_MARK}{finished_pid()}")  # the writer was killed
    tmp.write_bytes(b"partial")
    np.save(shard, np.zeros((1, 2, 2), np.int16))
    before = shard_mtimes(out)

    report = prepare_store(phantom_tree, out, progress=False)
    assert (report.series_written, report.series_reused) == (1, 2)
    assert not tmp.exists()
    after = shard_mtimes(out)
    changed = {k for k in after if after[k] != before[k]}
    assert changed == {lost["shard"]}
    assert np.load(shard).shape == (8, 48, 48)
    assert len(index_lines(out)) == 3
    assert len(SliceStore(out)) == 24


def test_torn_index_line_and_missing_shard_are_redone(phantom_tree, tmp_path):
    out = tmp_path / "store"
    prepare_store(phantom_tree, out, progress=False)
    lines = index_lines(out)
    (out / INDEX_FILE).write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    gone = json.loads(lines[0])["shard"]
    (out / gone).unlink()
    report = prepare_store(phantom_tree, out, progress=False)
    assert (report.series_written, report.series_reused) == (2, 1)
    assert len(index_lines(out)) == 3 and all(json.loads(ln) for ln in index_lines(out))
    assert len(SliceStore(out)) == 24


def test_changed_settings_refuse_to_resume(phantom_tree, tmp_path, capsys):
    out = tmp_path / "store"
    assert main([str(phantom_tree), str(out), "--no-progress", "--workers", "1"]) == 0
    capsys.readouterr()
    assert main([str(phantom_tree), str(out), "--no-progress", "--workers", "1", "--size", "32"]) == 2
    assert "prepared with settings" in capsys.readouterr().err


def test_parallel_workers_with_size_and_spacing(phantom_tree, tmp_path):
    out = tmp_path / "store"
    report = prepare_store(phantom_tree, out, workers=2, size=32, spacing=5.0, progress=False)
    assert report.series_written == 3
    store = SliceStore(out)
    assert len(store) == 24
    rec = store.record(0)
    # 48 px at 7.5 mm -> 72 px at 5 mm, then resized to 32 px: 360 mm / 32 = 11.25 mm
    assert rec.shape == (32, 32)
    assert rec.spacing == pytest.approx((11.25, 11.25))
    hu = store.read_hu(0)
    assert hu.shape == (32, 32) and hu.dtype == np.int16
    assert hu.min() >= -1024 and hu.max() > 0


def test_a_failing_series_does_not_lose_the_others(phantom_tree, tmp_path, monkeypatch, caplog):
    import ctssl.data.prepare as prepare_module

    real_write = prepare_module.write_shard_atomic
    calls = []

    def flaky_write(path, array):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real_write(path, array)

    monkeypatch.setattr(prepare_module, "write_shard_atomic", flaky_write)
    out = tmp_path / "store"
    report = prepare_store(phantom_tree, out, progress=False)
    assert (report.series_written, report.series_failed) == (2, 1)
    assert "disk full" in caplog.text and "rerun ctssl-prepare to resume" in caplog.text
    assert len(index_lines(out)) == 2
    monkeypatch.setattr(prepare_module, "write_shard_atomic", real_write)
    again = prepare_store(phantom_tree, out, progress=False)
    assert (again.series_written, again.series_reused, again.series_failed) == (1, 2, 0)
    assert len(SliceStore(out)) == 24


def test_a_second_image_at_a_slice_position_is_skipped_with_the_reason(phantom_tree, tmp_path):
    first = series_dirs(phantom_tree)[0]
    original = sorted(first.glob("*.dcm"))[3]
    ds = read(original)
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["re-export"])  # a re-export: new UID, same place
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(str(first / "zz_reexport.dcm"))
    out = tmp_path / "store"
    report = prepare_store(phantom_tree, out, progress=False)
    assert report.series_written == 3 and len(SliceStore(out)) == 24
    reason = skipped_rows(out)["zz_reexport.dcm"]
    assert reason.startswith("same slice position (") and reason.endswith(f"mm) as {original}")


# ---------------------------------------------------------------- interruption, concurrency, failures

@pytest.fixture(scope="module")
def many_series(tmp_path_factory) -> Path:
    """24 one-series patients: seconds of conversion with 2 workers, long enough to interrupt or overlap."""
    from ctssl.data.phantom import make_synthetic_ct

    return make_synthetic_ct(tmp_path_factory.mktemp("many"), n_patients=24, slices_per_series=8, size=64, seed=5,
                             labeled=False).dicom_dir


def _prepare_process(dicom: Path, out: Path) -> subprocess.Popen:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-m", "ctssl.data.prepare", str(dicom), str(out), "--workers", "2",
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_index(out: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not ((out / INDEX_FILE).is_file() and index_lines(out)):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"ctssl-prepare wrote no index line (exit {proc.poll()}): {proc.communicate()[1]}")
        time.sleep(0.02)


def _shards(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in (out / "shards").rglob("*.npy"))


def test_ctrl_c_stops_prepare_at_once_and_keeps_what_finished(many_series, tmp_path):
    out = tmp_path / "store"
    proc = _prepare_process(many_series, out)
    _wait_for_index(out, proc)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends to the command
    interrupted = time.monotonic()
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("ctssl-prepare hung after Ctrl-C")
    stopped_after = time.monotonic() - interrupted
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    assert stopped_after < 5.0, stopped_after  # about a second; slack for a busy machine
    indexed, shards = len(index_lines(out)), _shards(out)
    time.sleep(1.0)
    assert _shards(out) == shards  # no worker goes on converting after the exit
    assert 1 <= indexed < 24
    assert len(shards) <= indexed + 2  # beyond the indexed series, at most the two being written when stopped
    report = prepare_store(many_series, out, workers=2, progress=False)
    assert (report.series_reused, report.series_written, report.series_failed) == (indexed, 24 - indexed, 0)
    assert len(SliceStore(out)) == 24 * 8
    assert not [p for p in out.rglob(f"*{TEMP_MARK}*")]


def test_a_second_prepare_into_the_same_store_is_refused(many_series, tmp_path, capsys):
    out = tmp_path / "store"
    proc = _prepare_process(many_series, out)
    try:
        _wait_for_index(out, proc)
        assert main([str(many_series), str(out), "--workers", "1", "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"ctssl-prepare: error: {out} is being prepared by another ctssl-prepare (process {proc.pid}); "
                       f"wait for it to finish, or prepare into another OUT_DIR")
        assert proc.wait(timeout=120) == 0
    finally:
        proc.kill()
    assert len(index_lines(out)) == 24 and len(SliceStore(out)) == 24 * 8  # no series twice


def test_series_failing_for_other_reasons_than_bad_files_exit_non_zero(phantom_tree, tmp_path, monkeypatch, capsys):
    import ctssl.data.prepare as prepare_module

    real_write = prepare_module.write_shard_atomic
    calls = []

    def disk_full_after_one(path, array):
        calls.append(path)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, array)

    monkeypatch.setattr(prepare_module, "write_shard_atomic", disk_full_after_one)
    assert main([str(phantom_tree), str(tmp_path / "store"), "--workers", "1", "--no-progress", "-q"]) == 1
    err = capsys.readouterr().err
    assert "ctssl-prepare: error: 2 of 3 series failed (OSError: [Errno 28] No space left on device)" in err
    assert "the 1 finished are kept" in err


def test_study_stops_when_prepare_fails(tmp_path, monkeypatch, capsys):
    import ctssl.data.prepare as prepare_module
    from ctssl.train import study

    real_write = prepare_module.write_shard_atomic
    calls = []

    def disk_full_after_one(path, array):  # 1 of the 2 series is written
        calls.append(path)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, array)

    monkeypatch.setattr(prepare_module, "write_shard_atomic", disk_full_after_one)
    assert study.main(["--preset", "test", "--out", str(tmp_path / "study"), "--threads", "1"]) == 1
    assert "1 of 2 series failed" in capsys.readouterr().err
    assert not (tmp_path / "study" / "pretrain").exists()


@pytest.mark.parametrize("case", ["a file", "under a file", "read-only"])
def test_unusable_out_dir_is_one_line(case, phantom_tree, tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    out = {"a file": a_file, "under a file": a_file / "store", "read-only": tmp_path / "store"}[case]
    if case == "read-only":
        monkeypatch.setattr(os, "access", lambda path, mode: False)  # root ignores chmod; as on a read-only mount
    assert main([str(phantom_tree), str(out), "--workers", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ctssl-prepare: error: OUT_DIR {out}") and "\n" not in err
    assert {"a file": "is a file, not a directory", "under a file": f"{a_file} is a file",
            "read-only": "not writable"}[case] in err


def test_full_disk_while_writing_the_index_is_one_line(phantom_tree, tmp_path, monkeypatch, capsys):
    import ctssl.data.prepare as prepare_module

    def disk_full(f, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(prepare_module, "_append_line", disk_full)
    assert main([str(phantom_tree), str(tmp_path / "store"), "--workers", "1", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("ctssl-prepare: error:") and "no space left on the device" in err
    assert "\n" not in err
