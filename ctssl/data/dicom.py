"""Read CT DICOM trees (LIDC-IDRI style) into sorted series of Hounsfield-unit slices.

Reading is split in two steps so a large tree can be converted in parallel:
``read_header`` is cheap (pixel data is not loaded) and decides which files are usable CT
images; ``group_series`` turns headers into sorted series; ``read_slice_hu`` decodes one
file's pixels into HU. Every file that is not used gets a ``SkippedFile`` with a reason a
person can act on, instead of an exception that stops a long run.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

log = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"

AIR_HU = -1000.0
"""Value given to padding and out-of-field-of-view pixels."""

LOWEST_TISSUE_HU = -1024.0
"""HU below this cannot be air or tissue; scanners write them outside the field of view."""

PAPER_MIN_FILES = 11
"""Wolf et al. (2023) counted a folder as a CT series when it held more than 10 files."""

_DECODER_HINTS = {
    "1.2.840.10008.1.2.4.50": "pip install pylibjpeg pylibjpeg-libjpeg (or Pillow for 8-bit)",
    "1.2.840.10008.1.2.4.51": "pip install pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.57": "pip install pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.70": "pip install pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.80": "pip install pyjpegls (or pylibjpeg pylibjpeg-libjpeg)",
    "1.2.840.10008.1.2.4.81": "pip install pyjpegls (or pylibjpeg pylibjpeg-libjpeg)",
    "1.2.840.10008.1.2.4.90": "pip install pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.91": "pip install pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.201": "pip install pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.202": "pip install pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pip install pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "pip install pylibjpeg pylibjpeg-rle",
}
_GENERIC_DECODER_HINT = "pip install python-gdcm, or convert the file with 'gdcmconv --raw'"


class SliceReadError(Exception):
    """A file's pixels could not be turned into HU; the message is the skip reason."""


@dataclass(frozen=True)
class SkippedFile:
    """A file left out of the store, with the reason shown in ``skipped.csv``."""

    path: str
    reason: str


@dataclass(frozen=True)
class SliceHeader:
    """What the reader needs to know about one CT image file, without its pixels."""

    path: str
    patient: str
    study: str
    series: str
    sop_instance: str
    rows: int
    columns: int
    position: float | None
    """ImagePositionPatient projected on the slice normal (mm), None when unknown."""
    instance: int | None
    spacing: tuple[float, float] | None
    """PixelSpacing as (row spacing, column spacing) in mm."""
    thickness: float | None
    transfer_syntax: str


@dataclass
class CTSeries:
    """The usable slices of one SeriesInstanceUID, sorted along the slice normal."""

    patient: str
    study: str
    series: str
    slices: list[SliceHeader] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.slices[0].rows, self.slices[0].columns)

    @property
    def spacing(self) -> tuple[float, float] | None:
        return self.slices[0].spacing


def find_files(root: str | os.PathLike) -> list[str]:
    """Every regular file below ``root`` in a stable (sorted) order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if os.path.isfile(path):
                found.append(path)
    return found


def _dcmread(path: str, **kwargs) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path, **kwargs)


def _read_dataset_header(path: str) -> pydicom.Dataset:
    """Read a file with large values deferred; accept preamble-less files that look like images."""
    try:
        return _dcmread(path, defer_size=1024)
    except InvalidDicomError:
        pass
    ds = _dcmread(path, defer_size=1024, force=True)
    if "SOPClassUID" not in ds and "Modality" not in ds:
        raise InvalidDicomError("no DICOM header")
    return ds


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """Unit normal of the image plane from ImageOrientationPatient (row x column cosines)."""
    o = np.asarray(orientation, dtype=np.float64)
    n = np.cross(o[:3], o[3:6])
    norm = np.linalg.norm(n)
    if norm == 0:
        raise ValueError("degenerate ImageOrientationPatient")
    return n / norm


def _float_list(value) -> list[float] | None:
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    return out if all(np.isfinite(out)) else None


def _slice_position(ds: pydicom.Dataset) -> float | None:
    ipp = _float_list(ds.get("ImagePositionPatient"))
    iop = _float_list(ds.get("ImageOrientationPatient"))
    if ipp is None or iop is None or len(ipp) != 3 or len(iop) != 6:
        return None
    try:
        return float(np.dot(ipp, slice_normal(iop)))
    except ValueError:
        return None


def _pixel_spacing(ds: pydicom.Dataset) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        values = _float_list(ds.get(keyword))
        if values and len(values) == 2 and min(values) > 0:
            return (values[0], values[1])
    return None


def _optional_int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _optional_float(value) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None


def read_header(path: str) -> SliceHeader | SkippedFile:
    """Describe one file as a usable single-frame grey CT image, or say why it is not."""
    try:
        ds = _read_dataset_header(path)
    except InvalidDicomError:
        return SkippedFile(path, "not a DICOM file")
    except Exception as exc:  # corrupt headers raise many kinds of errors
        return SkippedFile(path, f"unreadable DICOM header ({type(exc).__name__}: {exc})")

    meta = getattr(ds, "file_meta", None)
    sop_class = str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else ""))
    if sop_class == MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds:
        return SkippedFile(path, "DICOMDIR index file, not an image")
    modality = str(ds.get("Modality", "") or "").upper()
    if modality != "CT" and not (modality == "" and sop_class.startswith(CT_IMAGE_STORAGE)):
        return SkippedFile(path, f"modality {modality or 'missing'}, not CT")
    if "PixelData" not in ds:
        return SkippedFile(path, "no pixel data (not an image, or the file is truncated)")
    frames = _optional_int(ds.get("NumberOfFrames")) or 1
    if frames != 1 or sop_class == ENHANCED_CT_IMAGE_STORAGE:
        return SkippedFile(path, f"multi-frame image ({frames} frames) is not supported")
    samples = _optional_int(ds.get("SamplesPerPixel")) or 1
    if samples != 1:
        return SkippedFile(path, f"{samples} samples per pixel; CT slices must be grey")
    rows, columns = _optional_int(ds.get("Rows")), _optional_int(ds.get("Columns"))
    if not rows or not columns:
        return SkippedFile(path, "missing Rows/Columns")
    series = str(ds.get("SeriesInstanceUID", "") or "")
    if not series:
        return SkippedFile(path, "missing SeriesInstanceUID")

    patient = str(ds.get("PatientID", "") or "") or os.path.basename(os.path.dirname(path)) or "unknown"
    sop = str(ds.get("SOPInstanceUID", "") or (meta.get("MediaStorageSOPInstanceUID", "") if meta else ""))
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    return SliceHeader(
        path=path,
        patient=patient,
        study=str(ds.get("StudyInstanceUID", "") or ""),
        series=series,
        sop_instance=sop or path,
        rows=rows,
        columns=columns,
        position=_slice_position(ds),
        instance=_optional_int(ds.get("InstanceNumber")),
        spacing=_pixel_spacing(ds),
        thickness=_optional_float(ds.get("SliceThickness")),
        transfer_syntax=syntax,
    )


def sort_slices(slices: Iterable[SliceHeader]) -> list[SliceHeader]:
    """Order along the slice normal; InstanceNumber when a position is missing; else by path."""
    slices = list(slices)
    if all(s.position is not None for s in slices):
        return sorted(slices, key=lambda s: (s.position, s.instance if s.instance is not None else 0, s.path))
    if all(s.instance is not None for s in slices):
        return sorted(slices, key=lambda s: (s.instance, s.path))
    return sorted(slices, key=lambda s: s.path)


def group_series(
    items: Iterable[SliceHeader | SkippedFile], min_files: int = 1
) -> tuple[list[CTSeries], list[SkippedFile]]:
    """Group CT headers by SeriesInstanceUID and sort them; report every file left out.

    A series with fewer than ``min_files`` CT image files is dropped (``PAPER_MIN_FILES`` = 11
    reproduces the paper). Duplicate SOPInstanceUIDs and slices whose size differs from the
    series' most common size are dropped file by file.
    """
    skipped: list[SkippedFile] = []
    by_series: dict[str, list[SliceHeader]] = defaultdict(list)
    for item in items:
        if isinstance(item, SkippedFile):
            skipped.append(item)
        else:
            by_series[item.series].append(item)

    result = []
    for uid in sorted(by_series):
        slices = sorted(by_series[uid], key=lambda s: s.path)
        unique: dict[str, SliceHeader] = {}
        for s in slices:
            if s.sop_instance in unique:
                skipped.append(SkippedFile(s.path, f"duplicate SOPInstanceUID of {unique[s.sop_instance].path}"))
            else:
                unique[s.sop_instance] = s
        slices = list(unique.values())
        if len(slices) < min_files:
            reason = f"series has {len(slices)} CT files, fewer than min_files={min_files}"
            skipped.extend(SkippedFile(s.path, reason) for s in slices)
            continue
        size_counts = Counter((s.rows, s.columns) for s in slices)
        rows, cols = max(size_counts, key=lambda k: (size_counts[k], k))
        kept = []
        for s in slices:
            if (s.rows, s.columns) != (rows, cols):
                skipped.append(
                    SkippedFile(s.path, f"slice size {s.rows}x{s.columns} differs from the series' {rows}x{cols}")
                )
            else:
                kept.append(s)
        first = kept[0]
        result.append(CTSeries(patient=first.patient, study=first.study, series=uid, slices=sort_slices(kept)))
    return result, skipped


SAME_POSITION_MM = 0.01
"""Images of one series closer than this along the slice normal show the same slice (e.g. a re-export
under a new SOPInstanceUID); ctssl-prepare keeps the first that decodes."""


def scan_dicom_tree(root: str | os.PathLike, min_files: int = 1) -> tuple[list[CTSeries], list[SkippedFile]]:
    """Find, group and sort all CT series below ``root`` (single process; see prepare for parallel)."""
    return group_series((read_header(p) for p in find_files(root)), min_files=min_files)


_warned_missing_rescale = False


def _rescale_params(ds: pydicom.Dataset, path: str) -> tuple[float, float]:
    global _warned_missing_rescale
    slope = _optional_float(ds.get("RescaleSlope"))
    intercept = _optional_float(ds.get("RescaleIntercept"))
    if slope is None or intercept is None:
        if not _warned_missing_rescale:
            _warned_missing_rescale = True
            log.warning(
                "RescaleSlope/RescaleIntercept missing in %s (and maybe other files); "
                "using slope 1, intercept 0", path,
            )
        return 1.0, 0.0
    return slope, intercept


def _padding_mask(raw: np.ndarray, ds: pydicom.Dataset) -> np.ndarray | None:
    """Pixels equal to PixelPaddingValue (or inside the padding range), compared on stored values."""
    pad = _optional_int(ds.get("PixelPaddingValue"))
    if pad is None:
        return None
    limit = _optional_int(ds.get("PixelPaddingRangeLimit"))
    bits = _optional_int(ds.get("BitsAllocated")) or 16
    # The same stored bits can be read as signed or unsigned when the VR disagrees with
    # PixelRepresentation; compare against both interpretations.
    candidates = {pad}
    if pad < 0:
        candidates.add(pad + (1 << bits))
    elif pad >= 1 << (bits - 1):
        candidates.add(pad - (1 << bits))
    raw = raw.astype(np.int64, copy=False)
    mask = np.zeros(raw.shape, dtype=bool)
    for value in candidates:
        if limit is None:
            mask |= raw == value
        else:
            lo, hi = sorted((value, limit))
            mask |= (raw >= lo) & (raw <= hi)
    return mask


def raw_to_hu(raw: np.ndarray, ds: pydicom.Dataset, path: str = "") -> np.ndarray:
    """Stored values to float32 HU; padding and out-of-FOV pixels become air (-1000 HU)."""
    if "ModalityLUTSequence" in ds:
        hu = _apply_modality_lut(raw, ds).astype(np.float32)
    else:
        slope, intercept = _rescale_params(ds, path)
        hu = raw.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    mask = _padding_mask(raw, ds)
    if mask is not None:
        hu[mask] = AIR_HU
    hu[hu < LOWEST_TISSUE_HU] = AIR_HU
    return hu


def _apply_modality_lut(raw: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    try:
        from pydicom.pixels import apply_modality_lut
    except ImportError:  # pydicom < 3
        from pydicom.pixel_data_handlers.util import apply_modality_lut
    return apply_modality_lut(raw, ds)


def _transfer_syntax_name(uid: str) -> str:
    try:
        return pydicom.uid.UID(uid).name
    except Exception:
        return uid


def _syntax_kind(syntax: str) -> str:
    """"native" (uncompressed), "compressed", or "unknown" for a transfer syntax UID."""
    if not syntax:
        return "native"  # no file meta: pydicom assumes implicit VR little endian
    try:
        uid = pydicom.uid.UID(syntax)
        if not uid.is_transfer_syntax:
            return "unknown"
        return "compressed" if uid.is_compressed else "native"
    except ValueError:  # pydicom 2 raises for private UIDs
        return "unknown"


def decode_failure_reason(syntax: str, exc: BaseException) -> str:
    """A skip reason for pixel data that could not be decoded, with what to install."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    kind = _syntax_kind(syntax)
    if kind == "compressed":
        hint = _DECODER_HINTS.get(syntax, _GENERIC_DECODER_HINT)
        return (f"cannot decode {_transfer_syntax_name(syntax)} ({syntax}) pixel data: {message}; "
                f"install a decoder: {hint}")
    if kind == "unknown":
        return f"unsupported transfer syntax {syntax}: {message}; {_GENERIC_DECODER_HINT}"
    return f"corrupt pixel data ({_transfer_syntax_name(syntax)}): {message}"


def _check_native_length(ds: pydicom.Dataset, syntax: str) -> None:
    """Uncompressed pixel data shorter than Rows x Columns x BitsAllocated means a cut-off file."""
    if _syntax_kind(syntax) != "native":
        return
    rows, cols = _optional_int(ds.get("Rows")) or 0, _optional_int(ds.get("Columns")) or 0
    bits = _optional_int(ds.get("BitsAllocated")) or 16
    samples = _optional_int(ds.get("SamplesPerPixel")) or 1
    expected = rows * cols * samples * bits // 8
    try:
        actual = len(ds.PixelData)
    except Exception as exc:
        raise SliceReadError(f"unreadable pixel data ({type(exc).__name__}: {exc})") from exc
    if actual < expected:
        raise SliceReadError(f"truncated pixel data: {actual} of {expected} bytes")


def read_slice_hu(path: str) -> tuple[np.ndarray, pydicom.Dataset]:
    """Decode one CT file to float32 HU (H, W); raise ``SliceReadError`` with a skip reason."""
    try:
        ds = _dcmread(path, force=True)
    except Exception as exc:
        raise SliceReadError(f"unreadable DICOM file ({type(exc).__name__}: {exc})") from exc
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if "PixelData" not in ds:
        raise SliceReadError("no pixel data (not an image, or the file is truncated)")
    _check_native_length(ds, syntax)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = ds.pixel_array
    except Exception as exc:  # handlers and decoders raise many error types
        raise SliceReadError(decode_failure_reason(syntax, exc)) from exc
    if raw.ndim != 2:
        raise SliceReadError(f"expected one grey 2-D frame, got pixel array of shape {raw.shape}")
    return raw_to_hu(raw, ds, path), ds
