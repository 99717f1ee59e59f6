"""A prepared slice store: int16 HU slices in memory-mappable ``.npy`` shards plus an index.

Layout of a store directory::

    store.json     format version and the settings the store was prepared with
    index.jsonl    one JSON line per finished series (its slices, positions, shard file)
    shards/<patient>/<series>.npy   int16 array (slices, H, W) of HU, sorted along the normal
    skipped.csv    every input file left out, and why

Training reads slices with ``np.load(mmap_mode="r")``: no pydicom, no decoding, cheap for many
DataLoader workers. A series appears in the index only after its shard was renamed into place,
so an index line always points at a complete shard.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..atomic import open_atomically

log = logging.getLogger(__name__)

STORE_FORMAT = "ctssl-slice-store"
STORE_VERSION = 1
STORE_FILE = "store.json"
INDEX_FILE = "index.jsonl"
SKIPPED_FILE = "skipped.csv"
SHARD_DIR = "shards"
HU_DTYPE = np.int16


class StoreError(ValueError):
    """A store file is missing or damaged; rerunning ``ctssl-prepare`` into the store rebuilds it.

    ``str()`` is one line also when a DataLoader worker re-raises it with the worker's traceback.
    """

    def __str__(self) -> str:
        text = super().__str__().strip()
        last = text.splitlines()[-1] if text else text
        return last.split(f"{type(self).__name__}: ", 1)[-1]


@dataclass(frozen=True)
class SliceRecord:
    """Metadata of one stored slice."""

    patient: str
    study: str
    series: str
    position: float | None
    """Position along the slice normal (mm); None when the files had no geometry."""
    spacing: tuple[float, float] | None
    """(row, column) pixel spacing in mm of the stored array."""
    shape: tuple[int, int]
    shard: str
    """Shard file, relative to the store root."""
    offset: int
    """Index of the slice inside the shard array."""
    source: str
    """The DICOM file it came from, relative to the prepared DICOM directory."""


def safe_name(text: str) -> str:
    """A file-name-safe version of a patient ID or UID."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")
    return cleaned[:120] or "unknown"


def shard_relpath(patient: str, series: str) -> str:
    return f"{SHARD_DIR}/{safe_name(patient)}/{safe_name(series)}.npy"


def write_shard_atomic(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` as .npy so that ``path`` is either absent or complete (temp file + rename)."""
    with open_atomically(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


def read_index(root: str | os.PathLike) -> list[dict]:
    """Finished-series entries of a store; a torn last line (crash while appending) is ignored."""
    path = Path(root) / INDEX_FILE
    if not path.exists():
        return []
    entries = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s line %d is incomplete and is ignored", path, number)
                continue
            entries.append(entry)
    return entries


def series_entry_is_complete(root: str | os.PathLike, entry: dict) -> bool:
    """True when the entry's shard exists with the number of slices the entry lists."""
    shard = Path(root) / entry.get("shard", "")
    if not shard.is_file():
        return False
    try:
        array = np.load(shard, mmap_mode="r")
    except (ValueError, OSError):
        return False
    return array.ndim == 3 and array.shape[0] == len(entry.get("positions", ())) and array.dtype == HU_DTYPE


class SliceStore:
    """Read-only view of a prepared store; ``read_hu(i)`` returns slice ``i`` as int16 HU.

    Picklable for DataLoader workers: open memory maps are not pickled, each worker opens the
    shards it touches (at most ``max_open_shards`` at a time, to stay under file-handle limits).
    """

    def __init__(self, root: str | os.PathLike, max_open_shards: int = 64):
        self.root = Path(root)
        if not (self.root / INDEX_FILE).exists():
            raise FileNotFoundError(f"{self.root} is not a prepared slice store (no {INDEX_FILE}); run ctssl-prepare")
        info_path = self.root / STORE_FILE
        self.info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.exists() else {}
        self.series = read_index(self.root)
        counts = np.array([len(e["positions"]) for e in self.series], dtype=np.int64)
        self._series_of = np.repeat(np.arange(len(self.series), dtype=np.int32), counts)
        self._offset_of = (
            np.concatenate([np.arange(n, dtype=np.int32) for n in counts]) if len(counts) else np.zeros(0, np.int32)
        )
        self.max_open_shards = max_open_shards
        self._open: OrderedDict[str, np.ndarray] = OrderedDict()
        self._records: list[SliceRecord] | None = None

    def __len__(self) -> int:
        return int(self._series_of.shape[0])

    def __repr__(self) -> str:
        return f"SliceStore({str(self.root)!r}, series={len(self.series)}, slices={len(self)})"

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        state["_records"] = None
        return state

    def _check_index(self, i: int) -> int:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"slice index {i} out of range for a store of {n} slices")
        return int(i)

    def _shard(self, rel: str) -> np.ndarray:
        array = self._open.get(rel)
        if array is None:
            path = self.root / rel
            try:
                array = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as exc:  # missing, truncated, or not an .npy file
                raise StoreError(f"store shard {path} is damaged or missing ({exc}); rerun ctssl-prepare on the "
                                 f"DICOM tree into {self.root} to rebuild it") from None
            if array.ndim != 3 or array.dtype != HU_DTYPE:
                raise StoreError(f"store shard {path} is damaged (an array of shape {array.shape} and type "
                                 f"{array.dtype}, not int16 slices); rerun ctssl-prepare on the DICOM tree into "
                                 f"{self.root} to rebuild it")
            self._open[rel] = array
            while len(self._open) > self.max_open_shards:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(rel)
        return array

    def read_hu(self, i: int) -> np.ndarray:
        """Slice ``i`` as an int16 (H, W) array of HU (a copy, safe to modify)."""
        i = self._check_index(i)
        entry = self.series[self._series_of[i]]
        shard = self._shard(entry["shard"])
        if self._offset_of[i] >= shard.shape[0]:
            raise StoreError(f"store shard {self.root / entry['shard']} holds {shard.shape[0]} slices, its index line "
                             f"{len(entry['positions'])}; rerun ctssl-prepare on the DICOM tree into {self.root}")
        return np.array(shard[self._offset_of[i]])

    def read_series_hu(self, s: int) -> np.ndarray:
        """Every slice of series ``s`` (an index of ``self.series``) as an int16 ``(slices, H, W)`` array of HU,
        in the stored order (along the slice normal); a copy."""
        if not 0 <= s < len(self.series):
            raise IndexError(f"series index {s} out of range for a store of {len(self.series)} series")
        entry = self.series[s]
        shard = self._shard(entry["shard"])
        if shard.shape[0] != len(entry["positions"]):
            raise StoreError(f"store shard {self.root / entry['shard']} holds {shard.shape[0]} slices, its index line "
                             f"{len(entry['positions'])}; rerun ctssl-prepare on the DICOM tree into {self.root}")
        return np.array(shard)

    def record(self, i: int) -> SliceRecord:
        """Metadata of slice ``i``."""
        i = self._check_index(i)
        entry = self.series[self._series_of[i]]
        k = int(self._offset_of[i])
        spacing = entry.get("spacing")
        return SliceRecord(
            patient=entry["patient"],
            study=entry.get("study", ""),
            series=entry["series"],
            position=entry["positions"][k],
            spacing=tuple(spacing) if spacing else None,
            shape=tuple(entry["shape"]),
            shard=entry["shard"],
            offset=k,
            source=entry["sources"][k] if "sources" in entry else "",
        )

    @property
    def records(self) -> list[SliceRecord]:
        """Metadata of every slice, in store order (built once, not pickled to workers)."""
        if self._records is None:
            self._records = [self.record(i) for i in range(len(self))]
        return self._records

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self.read_hu(i)

    @property
    def patients(self) -> list[str]:
        """Patient ID of every slice, in store order (for patient-wise splits)."""
        return [self.series[s]["patient"] for s in self._series_of]
