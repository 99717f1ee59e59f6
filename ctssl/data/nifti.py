"""NIfTI volumes (``.nii``, ``.nii.gz``) as CT series for ``ctssl-prepare``: one file, one series.

The store keeps DICOM's convention (LPS patient axes): slices along the normal in ascending
position, rows running towards posterior, columns towards the patient's left. A NIfTI file is
first brought to its closest canonical orientation (RAS+, axes only permuted and flipped, no
resampling; nibabel's ``as_closest_canonical``), then its x and y axes are flipped and the axes
ordered (z, y, x). Voxel values are taken as HU after nibabel applied ``scl_slope`` /
``scl_inter``. nibabel is an optional dependency (``pip install 'ctssl[nifti]'``).
"""
from __future__ import annotations

import os

import numpy as np

from .dicom import SliceReadError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
NIBABEL_MISSING = "NIfTI files need nibabel, which is not installed: pip install 'ctssl[nifti]' (nibabel>=5)"


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: str | os.PathLike) -> str:
    """The file name without ``.nii`` / ``.nii.gz``: the series' patient ID."""
    name = os.path.basename(str(path))
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def nibabel_available() -> bool:
    try:
        import nibabel  # noqa: F401
    except ImportError:
        return False
    return True


def read_nifti_hu(path: str | os.PathLike) -> tuple[np.ndarray, tuple[float, float], list[float]]:
    """A NIfTI CT volume as float32 HU ``(slices, rows, columns)`` in the store's orientation, its (row, column)
    pixel spacing in mm and each slice's position along the normal in mm (ascending).

    SliceReadError (one line naming the file) for unreadable files and images that are not one 3-D volume.
    """
    try:
        import nibabel as nib
    except ImportError:
        raise SliceReadError(NIBABEL_MISSING) from None
    try:
        image = nib.load(str(path))
        shape = tuple(image.shape)
        if len(shape) == 4 and shape[3] == 1:
            image = image.slicer[..., 0]
            shape = shape[:3]
        if len(shape) != 3:
            raise SliceReadError(f"a {len(shape)}-D image of shape {shape}, not one 3-D volume")
        canonical = nib.as_closest_canonical(image)
        data = np.asarray(canonical.get_fdata(dtype=np.float32))
        affine = np.asarray(canonical.affine, dtype=np.float64)
    except SliceReadError:
        raise
    except Exception as exc:  # nibabel's errors vary by format problem: truncated, bad header, ...
        raise SliceReadError(f"unreadable NIfTI ({type(exc).__name__}: {exc})") from None
    # RAS (i -> right, j -> anterior, k -> superior) to (slice k ascending, row -> posterior, column -> left)
    hu = np.ascontiguousarray(data[::-1, ::-1, :].transpose(2, 1, 0), dtype=np.float32)
    steps = np.linalg.norm(affine[:3, :3], axis=0)  # mm per voxel along i, j, k
    if not np.all(steps > 0):
        raise SliceReadError(f"the affine has a zero voxel size ({steps.tolist()})")
    normal = affine[:3, 2] / steps[2]
    origin = float(normal @ affine[:3, 3])
    positions = [origin + float(k) * float(steps[2]) for k in range(hu.shape[0])]
    return hu, (float(steps[1]), float(steps[0])), positions
