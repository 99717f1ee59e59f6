"""Output files that are never half-written, and one-line errors when they cannot be written.

Every file ctssl writes whole (checkpoints, configs, metrics, reports, pictures, store shards and
indexes, fraction files) goes through ``replace_atomically``: the bytes go to a hidden temp file
beside the target (``.NAME.tmp-PID``), are flushed to disk, and the temp file is renamed over the
target. A reader, a crash or a full disk therefore sees either the old or the new complete file.
A failed write removes its temp file and raises ``OutputError`` with one line that names the file
and the cause (full disk, read-only, no permission). A writer killed outright cannot clean up:
``remove_stale_temps`` removes the temp files of processes that no longer run.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

TEMP_MARK = ".tmp-"
_TEMP_NAME = re.compile(r"^\..+\.tmp-(\d+)$")

_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a parent of it is a file, not a directory",
    errno.EISDIR: "it is a directory",
}


class OutputError(OSError):
    """An output file or directory cannot be written; the message is one line for the user."""

    def __str__(self) -> str:  # OSError would prefix "[Errno N]"
        return str(self.args[0]) if self.args else "cannot write output"


def os_error_reason(exc: OSError) -> str:
    """A short, human phrase for an OSError ("no space left on the device")."""
    return _REASONS.get(exc.errno) or exc.strerror or str(exc) or type(exc).__name__


def describe_os_error(exc: OSError, where: str | os.PathLike | None = None) -> str:
    """One line for an OSError that reached a command's top (a full disk while appending to a log...)."""
    if isinstance(exc, OutputError):
        return str(exc)
    return f"{exc.filename or where or 'a file'}: {os_error_reason(exc)}"


def temp_path(path: str | os.PathLike) -> Path:
    """The hidden temp file a write of ``path`` goes through (``.NAME.tmp-PID``, same directory)."""
    path = Path(path)
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def replace_atomically(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path to write ``path``'s new content to; on success it replaces ``path``.

    For writers that take a file name (``torch.save``, ``savefig``, ``PIL``: give them the format,
    the temp name has no useful suffix). On any failure the temp file is removed and ``path`` is
    untouched; an OSError becomes an ``OutputError`` naming ``path`` and the cause.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(exc, OSError) and not isinstance(exc, OutputError):
            kept = "the previous file is unchanged" if path.is_file() else "nothing was written"
            raise OutputError(f"cannot write {path}: {os_error_reason(exc)} ({kept})") from exc
        raise
    _fsync_dir(path.parent)


@contextmanager
def open_atomically(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """``open(path, mode)`` whose content replaces ``path`` only when the block ends without error."""
    if "w" not in mode:
        raise ValueError(f"open_atomically writes a new file; mode {mode!r} has no 'w'")
    if "b" not in mode:
        open_kwargs.setdefault("encoding", "utf-8")
    with replace_atomically(path) as tmp:
        with open(tmp, mode, **open_kwargs) as f:
            yield f


def write_text(path: str | os.PathLike, text: str) -> Path:
    with open_atomically(path, "w", newline="") as f:
        f.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, doc: Any, **dump_kwargs) -> Path:
    """``json.dump(doc)`` to ``path`` atomically (a trailing newline; ``dump_kwargs`` go to json.dump)."""
    with open_atomically(path, "w") as f:
        json.dump(doc, f, **dump_kwargs)
        f.write("\n")
    return Path(path)


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """``dst`` becomes a complete copy of ``src`` (a hard link where the file system allows)."""
    with replace_atomically(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
    return Path(dst)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:
        return False
    return True


def remove_stale_temps(directory: str | os.PathLike, recursive: bool = False) -> int:
    """Remove temp files of ``replace_atomically`` left by writers that were killed; returns how many.

    A temp file whose process still runs (another writer at work) is kept; so is this process's own.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    removed = 0
    for path in (directory.rglob(f".*{TEMP_MARK}*") if recursive else directory.glob(f".*{TEMP_MARK}*")):
        match = _TEMP_NAME.match(path.name)
        if not match or not path.is_file():
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or _process_exists(pid):
            continue
        try:
            path.unlink()
            removed += 1
        except OSError:
            pass
    return removed


def check_output_dir(path: str | os.PathLike, what: str = "output directory") -> Path:
    """Refuse, before anything is written, an output directory that cannot be one.

    ``path`` is a file, lies below a file, or its nearest existing folder is not writable (read-only
    file system, no permission): OutputError with one line. Nothing is created here.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path} is a file, not a directory")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{what} {path} cannot be created: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "it" if existing == path else str(existing)
        raise OutputError(f"{what} {path} is not writable: {where} is on a read-only file system or lacks "
                          f"write permission")
    return path


__all__ = ["OutputError", "replace_atomically", "open_atomically", "write_text", "write_json", "copy_file",
           "remove_stale_temps", "check_output_dir", "temp_path", "os_error_reason", "describe_os_error", "TEMP_MARK"]
