"""Worker processes that Ctrl-C stops at once.

``concurrent.futures``' process pool, interrupted, still runs every task already handed to it and
can hang in its exit when a worker is blocked on the call queue. Here the workers never see SIGINT
(it is blocked while they are spawned and ignored once they run): the parent alone reacts, drops the
tasks not yet started and terminates the running ones. A terminated task's half-written file is a
temp file that the next run removes (``ctssl.atomic.remove_stale_temps``). Tasks are handed out a
few at a time, so an interrupt never leaves a long queue behind.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import signal
import threading
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Callable, Iterable, Iterator

_QUEUED_PER_WORKER = 2
_POLL_SECONDS = 0.5


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def sigint_deferred():
    """Hold back SIGINT (Ctrl-C) for a short block; it is delivered when the block ends.

    Around spawning workers, they start with it blocked and so cannot die half-started with a
    traceback; around appending an index line, the line is never torn.
    """
    if hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread():
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    else:
        yield


class WorkerPool:
    """``workers`` spawned processes; use as a context manager (an exception or Ctrl-C terminates them)."""

    def __init__(self, workers: int):
        self.workers = workers
        self._pending: set = set()  # futures handed out by as_completed and not yet yielded
        # spawn, not fork: safe whatever threads the parent runs
        self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_ignore_sigint)

    def map(self, fn: Callable, items: Iterable, chunksize: int = 1) -> Iterator:
        """Results in input order (an exception of a task is raised when its result is reached)."""
        with sigint_deferred():
            return self._pool.map(fn, items, chunksize=chunksize)

    def as_completed(self, fn: Callable, items: Iterable) -> Iterator:
        """``fn(item)`` of every item as each finishes; a task's exception (or a crashed worker's
        BrokenProcessPool) is yielded in place of its result."""
        items = iter(items)
        pending = self._pending

        def hand_out() -> None:
            with sigint_deferred():
                while len(pending) < _QUEUED_PER_WORKER * self.workers:
                    try:
                        item = next(items)
                    except StopIteration:
                        return
                    pending.add(self._pool.submit(fn, item))

        hand_out()
        while pending:
            done, _ = wait(pending, timeout=_POLL_SECONDS, return_when=FIRST_COMPLETED)
            for future in done:
                pending.discard(future)
                try:
                    yield future.result()
                except Exception as exc:
                    yield exc
            hand_out()

    def finish_running(self, grace: float = 1.0) -> Iterator:
        """After ``as_completed`` was interrupted: drop the tasks not started, give the running ones ``grace``
        seconds, and yield the results of every task that finished (to be kept), failures left out."""
        for future in self._pending:
            future.cancel()
        done, _ = wait(self._pending, timeout=grace)
        self._pending = set()
        for future in done:
            if not future.cancelled() and future.exception() is None:
                yield future.result()

    def terminate(self) -> None:
        """Drop the queued tasks and kill the running ones now."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        # the executor keeps its processes in a private mapping (Python 3.14 adds terminate_workers())
        processes = list((getattr(self._pool, "_processes", None) or {}).values())
        for process in processes:
            process.terminate()
        for process in processes:
            process.join(timeout=5)

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self._pool.shutdown(wait=True)
        else:
            self.terminate()


__all__ = ["WorkerPool", "sigint_deferred"]
