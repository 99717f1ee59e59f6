"""Run logs: JSON lines (``log.jsonl``, always), TensorBoard (when it imports), and a tqdm progress bar."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..atomic import open_atomically

LOG_FILE = "log.jsonl"


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_log(path: str | os.PathLike) -> list[dict]:
    """The records of a ``log.jsonl`` (a torn last line from a crash is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_log(path: str | os.PathLike, last_step: int) -> None:
    """Drop records after ``last_step`` (written by a run that crashed after its last checkpoint)."""
    path = Path(path)
    if not path.is_file():
        return
    kept = [r for r in read_log(path) if r.get("step", 0) <= last_step]
    with open_atomically(path) as f:
        for record in kept:
            f.write(json.dumps(record) + "\n")


class RunLogger:
    """Appends one JSON object per logged step to ``OUT/log.jsonl`` and mirrors scalars to TensorBoard.

    Disabled (a no-op) on ranks other than 0.
    """

    def __init__(self, out_dir: str | os.PathLike, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(out_dir) / LOG_FILE
        self._file = None
        self._tb = None
        self.tensorboard_reason: str | None = None
        if not enabled:
            return
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional: ctssl[tensorboard]
                self.tensorboard_reason = ("TensorBoard is not installed (pip install tensorboard): "
                                           "logging to log.jsonl only")
            except Exception as exc:
                self.tensorboard_reason = f"TensorBoard disabled ({type(exc).__name__}: {exc}): logging to " \
                                          f"log.jsonl only"
            else:
                self._tb = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"))

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _jsonable(v) for k, v in values.items()}, "time": time.time()}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"pretrain/{key}", value, step)

    def event(self, kind: str, /, **values: Any) -> None:
        """A non-step record (start, resume, note, end) in log.jsonl: ``{"event": kind, **values}``."""
        if not self.enabled:
            return
        record = {"event": kind, **{k: _jsonable(v) for k, v in values.items()}, "time": time.time()}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class Progress:
    """A tqdm bar over optimizer steps: loss, images/s, ETA (tqdm's). Silent when disabled or absent."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self._bar = None
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return
        self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr,
                         desc="pretrain")

    def update(self, n: int = 1, **postfix: Any) -> None:
        if self._bar is None:
            return
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(n)

    def write(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


__all__ = ["RunLogger", "Progress", "read_log", "truncate_log", "LOG_FILE"]
