"""Run logs: JSON lines (``log.jsonl``, always), TensorBoard (when it imports), Weights & Biases (when asked
for), a tqdm progress bar, and the run's throughput.

``log.jsonl`` holds three kinds of records: training steps ``{"step", "loss", ..., "time"}``, online
evaluations ``{"step", "kind": "eval", "knn_acc", ..., "time"}`` and events ``{"event": ..., "time"}``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..atomic import open_atomically

LOG_FILE = "log.jsonl"
EVAL_KIND = "eval"
WANDB_INSTALL = "pip install 'ctssl[wandb]'"


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

    def __init__(self, out_dir: str | os.PathLike, enabled: bool = True, tensorboard: bool = True,
                 wandb: "WandbSettings | None" = None):
        self.enabled = enabled
        self.path = Path(out_dir) / LOG_FILE
        self._file = None
        self._tb = None
        self._wandb = None
        self.tensorboard_reason: str | None = None
        if not enabled:
            return
        self._file = open(self.path, "a", encoding="utf-8")
        if wandb is not None:
            try:
                self._wandb = wandb.start(Path(out_dir))
            except ImportError:
                raise
            except Exception as exc:  # e.g. online mode without a login or network
                from .config import ConfigError

                self.close()
                raise ConfigError(f"--wandb: wandb.init failed ({type(exc).__name__}: {exc}); "
                                  f"--wandb-mode offline needs no network") from None
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
        self._mirror_wandb("pretrain", record, step)

    def log_eval(self, step: int, values: dict[str, Any]) -> None:
        """An online-evaluation record ``{"step", "kind": "eval", **values}``; TensorBoard/W&B under ``eval/``."""
        if not self.enabled:
            return
        record = {"step": int(step), "kind": EVAL_KIND, **{k: _jsonable(v) for k, v in values.items()},
                  "time": time.time()}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in _scalars(record).items():
                self._tb.add_scalar(f"eval/{key}", value, step)
        self._mirror_wandb("eval", record, step)

    def _mirror_wandb(self, prefix: str, record: dict, step: int) -> None:
        if self._wandb is not None:
            self._wandb.log({f"{prefix}/{k}": v for k, v in _scalars(record).items()}, step=int(step))

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
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _scalars(record: dict) -> dict[str, float]:
    return {k: v for k, v in record.items()
            if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)}


class WandbSettings:
    """What ``--wandb`` asks for; ``check()`` at the start of a run, ``start()`` by the logger of rank 0.

    The run id is kept in ``OUT/wandb_run_id``, so a resumed run continues the same W&B run.
    """

    RUN_ID_FILE = "wandb_run_id"

    def __init__(self, project: str, mode: str, config: dict, name: str | None = None):
        self.project, self.mode, self.config, self.name = project, mode, config, name

    @staticmethod
    def check():
        """The ``wandb`` module, or ImportError whose message names the extra to install."""
        try:
            import wandb
        except ImportError:
            raise ImportError(f"--wandb needs the wandb package, which is not installed: {WANDB_INSTALL}") from None
        return wandb

    def start(self, out_dir: Path):
        from ..atomic import write_text

        wandb = self.check()
        id_file = out_dir / self.RUN_ID_FILE
        run_id = id_file.read_text(encoding="utf-8").strip() if id_file.is_file() else ""
        if not run_id:
            import uuid

            run_id = uuid.uuid4().hex[:12]
            write_text(id_file, run_id + "\n")
        return wandb.init(project=self.project, mode=self.mode, dir=str(out_dir), config=self.config,
                          name=self.name or out_dir.name, id=run_id, resume="allow")


class Throughput:
    """Wall time and images/s of a run; the first step (warm-up: allocator, kernels, workers) is not averaged.

    ``clock`` is injectable for tests. ``mean_images_per_s`` is over steps 2..N of this process's
    session (after a resume: of the resumed part), time spent in ``paused()`` (online evaluation) left out.
    """

    def __init__(self, images_per_step: int, clock=time.perf_counter):
        self.images_per_step = images_per_step
        self._clock = clock
        self.start = clock()
        self.steps = 0
        self._first_done: float | None = None  # clock at the end of the first step
        self.paused_seconds = 0.0
        self._paused_after_first = 0.0

    def step(self) -> None:
        self.steps += 1
        if self.steps == 1:
            self._first_done = self._clock()

    @contextlib.contextmanager
    def paused(self):
        t0 = self._clock()
        try:
            yield
        finally:
            spent = self._clock() - t0
            self.paused_seconds += spent
            if self._first_done is not None:
                self._paused_after_first += spent

    @property
    def elapsed(self) -> float:
        return self._clock() - self.start

    def mean_images_per_s(self) -> float | None:
        """Images/s over the steps after the first (None before the second step)."""
        if self._first_done is None or self.steps < 2:
            return None
        seconds = self._clock() - self._first_done - self._paused_after_first
        return self.images_per_step * (self.steps - 1) / max(seconds, 1e-9)

    def eta_seconds(self, remaining_steps: int) -> float | None:
        """Remaining wall time at the pace since the first step (evaluations included)."""
        if self._first_done is None or self.steps < 2:
            return None
        return remaining_steps * (self._clock() - self._first_done) / (self.steps - 1)

    def summary(self, first_step: int) -> str:
        """The run's closing line: steps, total time, mean images/s (first step excluded)."""
        mean = self.mean_images_per_s()
        text = f"{self.steps} steps in {format_duration(self.elapsed)}"
        if self.paused_seconds > 0:
            text += f" (online evaluation {format_duration(self.paused_seconds)})"
        if mean is not None:
            text += (f"; mean {mean:.1f} images/s over steps {first_step + 2}-{first_step + self.steps} "
                     f"(step {first_step + 1} is warm-up and not counted; evaluation time excluded)")
        return text


def format_duration(seconds: float) -> str:
    """``h:mm:ss`` (or ``12.3 s`` under a minute)."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """A tqdm bar over optimizer steps: loss, images/s, ETA (tqdm's). Silent when disabled or absent."""

    PLAIN_EVERY_S = 30.0
    """Without tqdm, a plain progress line at most this often."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self._bar = None
        self._plain = False
        self.total, self.done = total, initial
        self._last_plain = time.perf_counter()
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            self._plain = True
            return
        self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr,
                         desc="pretrain")

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.done += n
        if self._plain and postfix and time.perf_counter() - self._last_plain >= self.PLAIN_EVERY_S:
            self._last_plain = time.perf_counter()
            print(f"pretrain {self.done}/{self.total} " + " ".join(f"{k}={v}" for k, v in postfix.items()),
                  file=sys.stderr, flush=True)
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


__all__ = ["RunLogger", "Progress", "Throughput", "WandbSettings", "read_log", "truncate_log", "format_duration",
           "LOG_FILE", "EVAL_KIND"]
