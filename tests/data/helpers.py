"""Builders of broken DICOM inputs for the reader and ctssl-prepare tests."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid


def pydicom_file(name: str) -> str:
    return get_testdata_file(name)


def series_dirs(tree: Path) -> list[Path]:
    """Folders holding .dcm files, sorted."""
    return sorted({p.parent for p in Path(tree).rglob("*.dcm")})


def read(path) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(str(path))


def write_truncated(src: Path, dst: Path, keep_fraction: float = 0.6) -> Path:
    data = Path(src).read_bytes()
    dst.write_bytes(data[: int(len(data) * keep_fraction)])
    return dst


def write_without_pixels(src: Path, dst: Path) -> Path:
    ds = read(src)
    del ds.PixelData
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[str(dst)])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(str(dst))
    return dst


def write_with_transfer_syntax(src: Path, dst: Path, syntax: str, encapsulate: bool = False) -> Path:
    """Copy ``src`` declaring another transfer syntax (its pixel bytes cannot decode as that)."""
    ds = read(src)
    ds.file_meta.TransferSyntaxUID = syntax
    if encapsulate:
        from pydicom.encaps import encapsulate as encaps

        ds.PixelData = encaps([ds.PixelData])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[str(dst)])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(str(dst))
    return dst


def write_resized_slice(src: Path, dst: Path, size: int) -> Path:
    """Same series, other matrix size."""
    ds = read(src)
    arr = ds.pixel_array[:size, :size].copy()
    ds.Rows, ds.Columns = arr.shape
    ds.PixelData = arr.tobytes()
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[str(dst)])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(str(dst))
    return dst


def copy_testdata(name: str, dst: Path) -> Path:
    shutil.copy(pydicom_file(name), dst)
    return dst


def decoder_available(syntax: str) -> bool:
    """Whether pydicom has a working decoder for ``syntax`` here."""
    try:
        from pydicom.pixels.decoders.base import get_decoder
    except ImportError:  # pydicom < 3: ask the pixel data handlers
        import pydicom.config

        return any(h.is_available() and h.supports_transfer_syntax(syntax) for h in pydicom.config.pixel_data_handlers)
    try:
        return get_decoder(syntax).is_available
    except Exception:  # unknown syntax
        return False


def hu_of(ds: pydicom.Dataset) -> np.ndarray:
    """Reference HU with pydicom's own modality LUT."""
    try:
        from pydicom.pixels import apply_modality_lut
    except ImportError:  # pydicom < 3
        from pydicom.pixel_data_handlers.util import apply_modality_lut
    return apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
