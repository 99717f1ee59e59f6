"""3-D data: series geometry from the store index, isotropic resampling, air padding, random crops, and NIfTI
volumes in ctssl-prepare (same store as the DICOM series of the same volume, whatever the file's orientation)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ctssl.data import prepare as prepare_module
from ctssl.data.phantom import write_dicom_series
from ctssl.data.prepare import UsageError, prepare_store
from ctssl.data.store import SliceStore
from ctssl.data.volumes import VolumeDataset, pad_to, resample_volume, series_geometry

DEPTH, SIDE, FOV_MM, STEP_MM, Z0 = 10, 24, 48.0, 2.5, -30.0  # pixel spacing 2 mm


def test_volume() -> np.ndarray:
    """An asymmetric HU volume (slices, rows, columns) so that any flip or transpose shows."""
    z, r, c = np.meshgrid(np.arange(DEPTH), np.arange(SIDE), np.arange(SIDE), indexing="ij")
    return (-800 + 30 * z + 7 * r + 2 * c).astype(np.int16)


test_volume.__test__ = False  # a helper, not a test


def write_dicom(root, hu):
    positions = Z0 + STEP_MM * np.arange(hu.shape[0])
    write_dicom_series(root / "P1" / "study" / "series", hu, positions, patient_id="P1", study_uid="1.2.3",
                       series_uid="1.2.3.4", size_mm=FOV_MM)


def test_series_geometry_from_positions_thickness_or_nothing():
    entry = {"series": "s", "spacing": [0.7, 0.8], "positions": [0.0, 2.5, 5.0, 7.5], "shape": [16, 20],
             "thickness": 9.0}
    assert series_geometry(entry, 3) == series_geometry(entry, 3)
    g = series_geometry(entry, 3)
    assert g.series == 3 and g.shape == (4, 16, 20) and g.spacing == (2.5, 0.7, 0.8)
    assert series_geometry({**entry, "positions": [None] * 4}).spacing[0] == 9.0
    with pytest.raises(ValueError, match="neither slice positions nor a slice thickness"):
        series_geometry({**entry, "positions": [None] * 4, "thickness": None})
    with pytest.raises(ValueError, match="no pixel spacing"):
        series_geometry({**entry, "spacing": None})


def test_resample_volume_spacing_and_linear_ramp():
    ramp = np.broadcast_to(np.arange(20, dtype=np.float32)[:, None, None], (20, 12, 30)).copy()
    out, spacing = resample_volume(ramp, (3.0, 1.0, 0.5), 1.5)
    assert out.shape == (40, 8, 10) and out.dtype == np.float32
    assert spacing == pytest.approx((1.5, 1.5, 1.5))
    # upsampling along depth keeps a ramp linear inside (edges clamp), other axes average a constant
    np.testing.assert_allclose(out[10:30, 3, 4], (np.arange(10, 30) + 0.5) / 2 - 0.5, atol=1e-4)


def test_pad_to_centres_air():
    padded = pad_to(np.zeros((3, 40, 5), np.float32), 8)
    assert padded.shape == (8, 40, 8)
    assert padded[0, 0, 0] == -1000 and padded[2:5, :, 1:6].max() == 0 and padded[5:].min() == -1000


def test_volume_crops_from_dicom_store(tmp_path):
    write_dicom(tmp_path / "dicom", test_volume())
    prepare_store(tmp_path / "dicom", tmp_path / "store", progress=False)
    ds = VolumeDataset(tmp_path / "store", crop=32, spacing=1.5, intensity="window:0,2000", crops_per_volume=3)
    assert len(ds) == 3 and ds.geometries[0].spacing == pytest.approx((2.5, 2.0, 2.0))
    volume = ds.volume(0)
    # 10 slices x 2.5 mm = 25 mm -> 17 voxels, padded to 32 with air; 24 px x 2 mm = 48 mm -> 32 voxels
    assert volume.shape == (32, 32, 32)
    assert volume[0].max() == pytest.approx(0.0) and volume[-1].max() == pytest.approx(0.0)  # air: -1000 HU
    assert volume[16, 16, 16] > 0.05  # tissue (above -900 HU); the phantom writer pads its corners with air
    torch.manual_seed(0)
    crop = ds[1]
    assert crop.shape == (1, 32, 32, 32) and crop.dtype == torch.float32 and 0 <= crop.min() and crop.max() <= 1
    three = VolumeDataset(tmp_path / "store", crop=16, channels=3, intensity="raw")
    assert three[0].shape == (3, 16, 16, 16) and float(three.volume(0).max()) == 1.0


def test_volume_dataset_is_picklable_without_its_cache(tmp_path):
    import pickle

    write_dicom(tmp_path / "dicom", test_volume())
    prepare_store(tmp_path / "dicom", tmp_path / "store", progress=False)
    ds = VolumeDataset(tmp_path / "store", crop=16)
    ds.volume(0)
    assert len(pickle.loads(pickle.dumps(ds))._cache) == 0


def test_volume_dataset_without_geometry_fails_clearly(tmp_path):
    write_dicom(tmp_path / "dicom", test_volume())
    prepare_store(tmp_path / "dicom", tmp_path / "store", progress=False)
    store = SliceStore(tmp_path / "store")
    store.series[0]["spacing"] = None
    with pytest.raises(ValueError, match="no series with a known geometry"):
        VolumeDataset(store)


# --------------------------------------------------------------------------------------------- NIfTI


def _nifti_orientations(hu: np.ndarray):
    """The same volume as NIfTI arrays + affines: DICOM's LPS axes as stored, and canonical RAS."""
    sp = FOV_MM / SIDE
    x0 = -FOV_MM / 2 + sp / 2  # write_dicom_series' first pixel centre (LPS)
    lps = hu.transpose(2, 1, 0)  # i: columns (towards L), j: rows (towards P), k: slices (towards S)
    lps_affine = np.array([[-sp, 0, 0, -x0], [0, -sp, 0, -x0], [0, 0, STEP_MM, Z0], [0, 0, 0, 1]])
    ras = lps[::-1, ::-1, :]
    last = x0 + (SIDE - 1) * sp
    ras_affine = np.array([[sp, 0, 0, -last], [0, sp, 0, -last], [0, 0, STEP_MM, Z0], [0, 0, 0, 1]])
    return {"lps": (lps, lps_affine), "ras": (ras, ras_affine)}


def write_scaled_nifti(path, stored: np.ndarray, affine: np.ndarray, slope: float, inter: float) -> None:
    """An int16 .nii whose header asks for ``HU = slope * stored + inter`` (nibabel resets the scaling of arrays it
    saves, so the two header fields are patched afterwards: scl_slope and scl_inter at bytes 112-119)."""
    import struct

    import nibabel as nib

    nib.save(nib.Nifti1Image(np.ascontiguousarray(stored, dtype=np.int16), affine), path)
    raw = bytearray(path.read_bytes())
    raw[112:120] = struct.pack("<ff", slope, inter)
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("orientation", ["lps", "ras"])
def test_nifti_series_equals_the_dicom_series(tmp_path, orientation):
    pytest.importorskip("nibabel", reason="NIfTI support needs the nibabel package (ctssl[nifti])")
    stored = (test_volume() - 20) // 2
    hu = (2 * stored + 20).astype(np.int16)
    write_dicom(tmp_path / "dicom", hu)
    data, affine = _nifti_orientations(stored)[orientation]
    (tmp_path / "nifti").mkdir()
    write_scaled_nifti(tmp_path / "nifti" / "case01.nii", data, affine, 2.0, 20.0)
    prepare_store(tmp_path / "dicom", tmp_path / "from_dicom", progress=False)
    report = prepare_store(tmp_path / "nifti", tmp_path / "from_nifti", progress=False)
    assert report.series_written == 1
    dicom_store, nifti_store = SliceStore(tmp_path / "from_dicom"), SliceStore(tmp_path / "from_nifti")
    entry = nifti_store.series[0]
    assert entry["patient"] == "case01" and entry["series"] == "nifti:case01.nii"
    from_nifti, from_dicom = nifti_store.read_series_hu(0), dicom_store.read_series_hu(0)
    np.testing.assert_array_equal(from_nifti, hu)
    inside = from_dicom != -1000  # the phantom writer pads the corners outside its round field of view with air
    assert inside.mean() > 0.5 and np.array_equal(from_nifti[inside], from_dicom[inside])
    np.testing.assert_allclose(entry["positions"], dicom_store.series[0]["positions"], atol=1e-4)
    np.testing.assert_allclose(entry["spacing"], dicom_store.series[0]["spacing"], atol=1e-5)
    crop = VolumeDataset(nifti_store, crop=32, spacing=1.5)[0]
    assert crop.shape == (1, 32, 32, 32)
    # resumable like DICOM: a rerun reuses the finished file
    again = prepare_store(tmp_path / "nifti", tmp_path / "from_nifti", progress=False)
    assert again.series_reused == 1 and again.series_written == 0


def test_nifti_that_is_not_one_volume_is_skipped_with_its_reason(tmp_path):
    nib = pytest.importorskip("nibabel", reason="NIfTI support needs the nibabel package (ctssl[nifti])")
    (tmp_path / "in").mkdir()
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 2), np.float32), np.eye(4)), tmp_path / "in" / "bold.nii")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.float32), np.eye(4)), tmp_path / "in" / "ok.nii")
    (tmp_path / "in" / "broken.nii.gz").write_bytes(b"not a nifti")
    report = prepare_store(tmp_path / "in", tmp_path / "store", progress=False)
    assert report.series_written == 1 and report.series_unusable == 2
    text = (tmp_path / "store" / "skipped.csv").read_text()
    assert "not one 3-D volume" in text and "unreadable NIfTI" in text


def test_nifti_without_nibabel_is_one_clear_error(tmp_path, monkeypatch):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "case.nii.gz").write_bytes(b"\x00")
    monkeypatch.setattr(prepare_module, "nibabel_available", lambda: False)
    with pytest.raises(UsageError, match=r"nibabel.*ctssl\[nifti\]"):
        prepare_store(tmp_path / "in", tmp_path / "store", progress=False)
