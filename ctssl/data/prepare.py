"""``ctssl-prepare``: convert a DICOM tree once into a slice store that training reads fast.

NIfTI volumes (``.nii``, ``.nii.gz``, with nibabel installed) below the same directory are
converted too, each file one series (``ctssl.data.nifti``: reoriented to the store's
convention, slice positions from the affine); the store then serves slices and volumes alike.

The run is resumable and never loses finished work: each series is written to a temp file and
renamed into place, and only then appended to the index; a rerun skips every indexed series.
Files that cannot be used (corrupt, truncated, non-image, non-CT, undecodable) are listed in
``skipped.csv`` with the reason and never stop the run.

A series counts as finished by its SeriesInstanceUID: files added to it later are not picked up
by a rerun (delete its line from ``index.jsonl`` to redo it).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..atomic import OutputError, check_output_dir, describe_os_error, os_error_reason, remove_stale_temps, write_text
from .dicom import (
    PAPER_MIN_FILES,
    SAME_POSITION_MM,
    CTSeries,
    SkippedFile,
    SliceHeader,
    SliceReadError,
    find_files,
    group_series,
    read_header,
    read_slice_hu,
)
from .nifti import NIBABEL_MISSING, is_nifti, nibabel_available, nifti_stem, read_nifti_hu
from .store import (
    HU_DTYPE,
    INDEX_FILE,
    SKIPPED_FILE,
    STORE_FILE,
    STORE_FORMAT,
    STORE_VERSION,
    read_index,
    series_entry_is_complete,
    shard_relpath,
    write_shard_atomic,
)
from .workers import WorkerPool, sigint_deferred

log = logging.getLogger(__name__)


_SCAN_CHUNK = 64
"""Files per header-reading task; trees of fewer than two chunks are scanned in-process."""


class UsageError(Exception):
    """A problem the user can fix (wrong path, no DICOM, changed settings): exit code 2."""


@dataclass(frozen=True)
class PrepareSettings:
    """Settings that shape the stored arrays; a store can only be resumed with the same ones."""

    min_files: int = 1
    size: int | None = None
    spacing: float | None = None


@dataclass
class PrepareReport:
    """What one run did."""

    out_dir: str
    series_written: int = 0
    series_reused: int = 0
    series_unusable: int = 0
    """Series none of whose files could be read (bad input, listed in skipped.csv)."""
    series_failed: int = 0
    """Series that failed for another reason (full disk, crashed decoder): the run exits non-zero."""
    first_failure: str | None = None
    slices_written: int = 0
    files_skipped: int = 0
    skipped_by_reason: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _SeriesJob:
    series: CTSeries
    out_dir: str
    dicom_dir: str
    settings: PrepareSettings


@dataclass(frozen=True)
class _NiftiJob:
    path: str
    out_dir: str
    root_dir: str
    settings: PrepareSettings

    @property
    def series(self) -> str:
        """The series ID of a NIfTI file: ``nifti:`` and its path below the prepared directory."""
        return nifti_series_id(self.path, self.root_dir)


def nifti_series_id(path: str, root_dir: str) -> str:
    return "nifti:" + os.path.relpath(path, root_dir).replace(os.sep, "/")


@dataclass
class _SeriesResult:
    series: str
    entry: dict | None
    skipped: list[SkippedFile]


def _to_int16(hu: np.ndarray) -> np.ndarray:
    info = np.iinfo(HU_DTYPE)
    return np.clip(np.rint(hu), info.min, info.max).astype(HU_DTYPE)


def _fit_slice(hu: np.ndarray, spacing, settings: PrepareSettings):
    """Resample to the target spacing and/or resize to the target size; returns (hu, spacing)."""
    from .intensity import resample_to_spacing, resize_shorter_and_center_crop

    if settings.spacing is not None:
        if spacing is None:
            raise SliceReadError("no PixelSpacing; cannot resample to --spacing")
        hu, spacing = resample_to_spacing(hu, spacing, settings.spacing)
    if settings.size is not None:
        h, w = hu.shape
        scale = settings.size / min(h, w)
        hu = resize_shorter_and_center_crop(hu, settings.size)
        if spacing is not None:
            spacing = (spacing[0] * h / max(settings.size, round(h * scale)),
                       spacing[1] * w / max(settings.size, round(w * scale)))
    return hu, spacing


def _same_position(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and abs(a - b) < SAME_POSITION_MM


def convert_series(job: _SeriesJob) -> _SeriesResult:
    """Decode, convert and write one series as an int16 shard; runs in a worker process."""
    series, settings = job.series, job.settings
    arrays, positions, sources, skipped = [], [], [], []
    out_spacing = None
    kept_path = None
    for header in series.slices:  # sorted along the normal: images at one position are neighbours
        try:
            hu, _ = read_slice_hu(header.path)
            if hu.shape != (header.rows, header.columns):
                raise SliceReadError(f"pixel array {hu.shape} does not match Rows/Columns")
            hu, spacing = _fit_slice(hu, header.spacing, settings)
            if arrays and hu.shape != arrays[0].shape:
                raise SliceReadError(f"converted size {hu.shape} differs from the series' {arrays[0].shape}")
        except SliceReadError as exc:
            skipped.append(SkippedFile(header.path, str(exc)))
            continue
        except Exception as exc:  # a decoder bug must not stop the other slices
            skipped.append(SkippedFile(header.path, f"unexpected error ({type(exc).__name__}: {exc})"))
            continue
        if positions and _same_position(header.position, positions[-1]):
            skipped.append(SkippedFile(header.path, f"same slice position ({header.position:g} mm) as {kept_path}"))
            continue
        if out_spacing is None:
            out_spacing = spacing
        kept_path = header.path
        arrays.append(_to_int16(hu))
        positions.append(header.position)
        sources.append(os.path.relpath(header.path, job.dicom_dir))
    if not arrays:
        return _SeriesResult(series.series, None, skipped)
    rel = shard_relpath(series.patient, series.series)
    write_shard_atomic(Path(job.out_dir) / rel, np.stack(arrays))
    entry = {
        "patient": series.patient,
        "study": series.study,
        "series": series.series,
        "shard": rel,
        "shape": list(arrays[0].shape),
        "spacing": [float(v) for v in out_spacing] if out_spacing is not None else None,
        "thickness": series.slices[0].thickness,
        "positions": positions,
        "sources": sources,
        "skipped": [[os.path.relpath(s.path, job.dicom_dir), s.reason] for s in skipped],
    }
    return _SeriesResult(series.series, entry, skipped)


_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@contextmanager
def _single_threaded_children():
    """Worker processes inherit one-thread BLAS/OpenMP settings: the processes are the parallelism."""
    saved = {k: os.environ.get(k) for k in _THREAD_VARIABLES}
    os.environ.update({k: "1" for k in _THREAD_VARIABLES})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def convert_nifti(job: _NiftiJob) -> _SeriesResult:
    """Read, convert and write one NIfTI volume as an int16 shard; runs in a worker process."""
    rel = os.path.relpath(job.path, job.root_dir)
    series = job.series
    try:
        volume, spacing, positions = read_nifti_hu(job.path)
        if volume.shape[0] < job.settings.min_files:
            raise SliceReadError(f"{volume.shape[0]} slices, fewer than --min-files {job.settings.min_files}")
        slices, out_spacing = [], spacing
        for hu in volume:
            hu, out_spacing = _fit_slice(hu, spacing, job.settings)
            slices.append(_to_int16(hu))
    except SliceReadError as exc:
        return _SeriesResult(series, None, [SkippedFile(job.path, str(exc))])
    patient = nifti_stem(job.path)
    shard = shard_relpath(patient, series)
    write_shard_atomic(Path(job.out_dir) / shard, np.stack(slices))
    entry = {
        "patient": patient,
        "study": "",
        "series": series,
        "shard": shard,
        "shape": list(slices[0].shape),
        "spacing": [float(v) for v in out_spacing],
        "thickness": abs(positions[1] - positions[0]) if len(positions) > 1 else None,
        "positions": positions,
        "sources": [f"{rel}#{k}" for k in range(len(slices))],
        "skipped": [],
    }
    return _SeriesResult(series, entry, [])


def convert_job(job: _SeriesJob | _NiftiJob) -> _SeriesResult:
    """One series of either kind (a DICOM series or a NIfTI file)."""
    return convert_nifti(job) if isinstance(job, _NiftiJob) else convert_series(job)


def _converted(pool: WorkerPool | None, jobs: Sequence[_SeriesJob | _NiftiJob]):
    """Yield each job's result (or the exception it raised) as soon as it is done."""
    if pool is None:
        for job in jobs:
            try:
                yield convert_job(job)
            except Exception as exc:
                yield exc
        return
    yield from pool.as_completed(convert_job, jobs)  # BrokenProcessPool when a decoder crashed a worker


LOCK_FILE = ".prepare.lock"


@contextmanager
def _store_lock(out: Path):
    """Hold ``OUT/.prepare.lock`` for the run: a second ctssl-prepare into the same store is refused.

    An OS file lock (flock), so a killed run leaves no stale lock behind.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(out / LOCK_FILE, "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise UsageError(f"{out} is being prepared by another ctssl-prepare (process {holder}); wait for it "
                             f"to finish, or prepare into another OUT_DIR") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _progress(iterable: Iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="series" if desc.startswith("convert") else "file")


def _check_settings(out: Path, settings: PrepareSettings) -> None:
    info_path = out / STORE_FILE
    if info_path.exists():
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise UsageError(f"{info_path} is corrupt ({exc}); prepare into a new directory") from None
        if info.get("format") != STORE_FORMAT:
            raise UsageError(f"{out} holds something else than a ctssl slice store; choose another OUT_DIR")
        old = info.get("settings", {})
        if old != asdict(settings):
            raise UsageError(
                f"{out} was prepared with settings {old}, not {asdict(settings)}; "
                "use the same --size/--spacing/--min-files to resume, or a new OUT_DIR"
            )
    elif (out / INDEX_FILE).exists():
        raise UsageError(f"{out} has an index but no {STORE_FILE}; choose a new OUT_DIR")
    else:
        info = {"format": STORE_FORMAT, "version": STORE_VERSION, "dtype": np.dtype(HU_DTYPE).name,
                "settings": asdict(settings)}
        write_text(info_path, json.dumps(info, indent=2) + "\n")


def _remove_leftover_temp_files(out: Path) -> int:
    removed = remove_stale_temps(out, recursive=True)
    if removed:
        log.info("removed %d temp file(s) left by an interrupted run", removed)
    return removed


def _load_finished(out: Path) -> dict[str, dict]:
    """Index entries whose shard is complete; rewrites the index if any entry had to be dropped."""
    entries = read_index(out)
    finished = {e["series"]: e for e in entries if "series" in e and series_entry_is_complete(out, e)}
    index_path = out / INDEX_FILE
    text = index_path.read_text(encoding="utf-8") if index_path.exists() else ""
    raw_lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(raw_lines) != len(finished):
        dropped = len(raw_lines) - len(finished)
        log.warning("%d index line(s) were incomplete or point at missing shards; those series are redone", dropped)
        write_text(index_path, "".join(json.dumps(e) + "\n" for e in finished.values()))
    return finished


def _append_line(f, text: str) -> None:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())


def prepare_store(
    dicom_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    workers: int = 1,
    min_files: int = 1,
    size: int | None = None,
    spacing: float | None = None,
    progress: bool = True,
) -> PrepareReport:
    """Convert every CT series below ``dicom_dir`` into the slice store ``out_dir`` (resumable)."""
    dicom = Path(dicom_dir)
    out = Path(out_dir)
    if not dicom.exists():
        raise UsageError(f"DICOM directory {dicom} does not exist")
    if not dicom.is_dir():
        raise UsageError(f"{dicom} is not a directory")
    if min_files < 1:
        raise UsageError(f"--min-files must be at least 1, got {min_files}")
    if size is not None and size < 1:
        raise UsageError(f"--size must be positive, got {size}")
    if spacing is not None and spacing <= 0:
        raise UsageError(f"--spacing must be positive, got {spacing}")
    out_resolved = out.resolve()
    files = [p for p in find_files(dicom) if out_resolved not in Path(p).resolve().parents]
    if not files:
        raise UsageError(f"no files found in {dicom}")
    nifti_files = [p for p in files if is_nifti(p)]
    files = [p for p in files if not is_nifti(p)]
    if nifti_files and not nibabel_available():
        raise UsageError(f"{len(nifti_files)} NIfTI file(s) in {dicom} (e.g. {nifti_files[0]}): {NIBABEL_MISSING}")

    settings = PrepareSettings(min_files=min_files, size=size, spacing=spacing)
    try:
        check_output_dir(out, "OUT_DIR")
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # OutputError, or a race with another process
        raise UsageError(str(exc) if isinstance(exc, OutputError) else f"OUT_DIR {out}: {os_error_reason(exc)}") \
            from None
    report = PrepareReport(out_dir=str(out))

    with ExitStack() as stack:
        stack.enter_context(_store_lock(out))
        _check_settings(out, settings)
        _remove_leftover_temp_files(out)
        finished = _load_finished(out)
        pool: list[WorkerPool] = []

        def executor(n_tasks: int) -> WorkerPool | None:
            """Worker processes once there is enough work for them; None: run in this process."""
            if workers <= 1 or n_tasks <= 1:
                return None
            if not pool:
                stack.enter_context(_single_threaded_children())
                pool.append(stack.enter_context(WorkerPool(workers)))  # workers import no torch
            return pool[0]

        scan = executor(len(files) // _SCAN_CHUNK)
        mapped = map(read_header, files) if scan is None else scan.map(read_header, files, chunksize=_SCAN_CHUNK)
        headers = list(_progress(mapped, len(files), "scan", progress))
        if not nifti_files and not any(isinstance(h, SliceHeader) for h in headers) and all(
            h.reason == "not a DICOM file" for h in headers
        ):
            raise UsageError(f"no DICOM files found in {dicom} ({len(files)} other files; NIfTI volumes, .nii or "
                             f".nii.gz, are accepted too)")
        series_list, scan_skipped = group_series(headers, min_files=min_files)

        skipped_path = out / SKIPPED_FILE
        rows = [(s.path, s.reason) for s in scan_skipped]
        for entry in finished.values():
            rows.extend((str(dicom / p), r) for p, r in entry.get("skipped", []))
        write_text(skipped_path, _csv_text([("path", "reason"), *rows]))
        _count_skips(report, [r for _, r in rows])

        if not series_list and not nifti_files and not finished:
            raise UsageError(
                f"no CT series found in {dicom}: {len(scan_skipped)} file(s) skipped, reasons in {skipped_path}"
            )
        nifti_jobs = [_NiftiJob(p, str(out), str(dicom), settings) for p in nifti_files]
        jobs: list[_SeriesJob | _NiftiJob] = [
            _SeriesJob(s, str(out), str(dicom), settings) for s in series_list if s.series not in finished]
        jobs += [j for j in nifti_jobs if j.series not in finished]
        report.series_reused = (sum(1 for s in series_list if s.series in finished)
                                + sum(1 for j in nifti_jobs if j.series in finished))
        results = _converted(executor(len(jobs)), jobs)
        with open(out / INDEX_FILE, "a", encoding="utf-8") as index, \
                open(skipped_path, "a", newline="", encoding="utf-8") as skip_file:
            writer = csv.writer(skip_file)

            def record(result: _SeriesResult | Exception) -> None:
                if isinstance(result, Exception):  # keep what is finished, report the rest
                    reason = f"{type(result).__name__}: {result}"
                    log.error("converting a series failed (%s); rerun ctssl-prepare to resume", reason)
                    report.series_failed += 1
                    report.first_failure = report.first_failure or reason
                    return
                with sigint_deferred():  # a Ctrl-C never tears an index line
                    if result.entry is not None:
                        _append_line(index, json.dumps(result.entry) + "\n")
                        report.series_written += 1
                        report.slices_written += len(result.entry["positions"])
                    else:
                        report.series_unusable += 1
                    writer.writerows((s.path, s.reason) for s in result.skipped)
                    skip_file.flush()
                _count_skips(report, [s.reason for s in result.skipped])

            try:
                for result in _progress(results, len(jobs), "convert", progress):
                    record(result)
            except KeyboardInterrupt:  # keep (index) what the workers finished, then stop them
                if pool:
                    for result in pool[0].finish_running(grace=1.0):
                        record(result)
                raise
    return report


def _csv_text(rows: Sequence[Sequence[str]]) -> str:
    import io

    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue()


def _count_skips(report: PrepareReport, reasons: Iterable[str]) -> None:
    for reason in reasons:
        report.files_skipped += 1
        key = reason.split(":")[0].split("(")[0].strip()
        report.skipped_by_reason[key] = report.skipped_by_reason.get(key, 0) + 1


def failure_message(report: PrepareReport) -> str:
    """One line for a run in which series failed for other reasons than bad input files."""
    total = report.series_written + report.series_reused + report.series_unusable + report.series_failed
    return (f"{report.series_failed} of {total} series failed ({report.first_failure}); the "
            f"{report.series_written + report.series_reused} finished are kept: fix the cause and rerun to resume")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctssl-prepare",
        description="Convert a DICOM tree (e.g. LIDC-IDRI) once into a sharded int16 HU slice store "
        "for fast pre-training. NIfTI volumes (.nii, .nii.gz; needs nibabel) below DICOM_DIR are "
        "converted too, one series per file. Resumable: a rerun skips finished series.",
    )
    parser.add_argument("dicom_dir", metavar="DICOM_DIR", help="root of the DICOM tree (and/or NIfTI files)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="store directory (created; reused to resume)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="parallel worker processes (default: CPU count, at most 8)")
    parser.add_argument("--min-files", type=int, default=1,
                        help=f"skip series with fewer CT files (default 1; {PAPER_MIN_FILES} reproduces the paper)")
    parser.add_argument("--size", type=int, default=None, help="store slices resized to SIZE x SIZE pixels")
    parser.add_argument("--spacing", type=float, default=None, help="store slices resampled to MM pixel spacing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s: %(message)s")
    start = time.perf_counter()
    try:
        report = prepare_store(
            args.dicom_dir, args.out_dir, workers=max(1, args.workers), min_files=args.min_files,
            size=args.size, spacing=args.spacing, progress=not args.no_progress and not args.quiet,
        )
    except UsageError as exc:
        print(f"ctssl-prepare: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. the disk filled up while writing skipped.csv or the index
        print(f"ctssl-prepare: error: {describe_os_error(exc, args.out_dir)}; finished series are kept, rerun to "
              f"resume", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ctssl-prepare: interrupted; finished series are kept, rerun to resume", file=sys.stderr)
        return 130
    if not args.quiet:
        print(
            f"ctssl-prepare: {report.series_written} series written ({report.slices_written} slices), "
            f"{report.series_reused} already done, {report.series_unusable} unreadable, "
            f"{report.series_failed} failed, {report.files_skipped} files skipped "
            f"(see {Path(args.out_dir) / SKIPPED_FILE}) in {time.perf_counter() - start:.1f} s"
        )
        for reason, count in sorted(report.skipped_by_reason.items(), key=lambda kv: -kv[1]):
            print(f"  {count:6d}  {reason}")
    if report.series_failed:
        print(f"ctssl-prepare: error: {failure_message(report)}", file=sys.stderr)
        return 1
    return 1 if report.series_unusable and not report.series_written and not report.series_reused else 0


if __name__ == "__main__":
    sys.exit(main())
