"""The synthetic CT set: deterministic, plausible HU, written as DICOM that reads back exactly."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from ctssl.data.dicom import read_header, read_slice_hu, scan_dicom_tree
from ctssl.data.labeled import load_csv
from ctssl.data.phantom import (
    labeled_slices,
    main,
    make_synthetic_ct,
    patient_params,
    phantom_series,
    random_nodule,
    render_slices,
    write_dicom_series,
)

from .conftest import PHANTOM_KW
from .helpers import read


def test_same_seed_same_phantom_other_seed_other_phantom():
    a, za, _ = phantom_series(3, 0, 4, 48)
    b, zb, _ = phantom_series(3, 0, 4, 48)
    c, _, _ = phantom_series(4, 0, 4, 48)
    d, _, _ = phantom_series(3, 1, 4, 48)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(za, zb)
    assert np.abs(a - c).mean() > 20 and np.abs(a - d).mean() > 20


def test_phantom_hu_look_like_chest_ct():
    hu, z, _ = phantom_series(0, 2, 6, 96)
    assert hu.dtype == np.float32 and hu.shape == (6, 96, 96)
    assert hu.min() >= -1024 and hu.max() <= 3071
    assert np.all(np.diff(z) > 0)
    mid = hu[3]
    assert (mid < -700).mean() > 0.3  # air around the body and lungs
    assert ((mid > -150) & (mid < 100)).mean() > 0.15  # fat, muscle, organs
    assert (mid > 300).sum() > 20  # spine and ribs
    assert np.abs(hu[1] - hu[4]).mean() > 5  # anatomy changes along the series


def test_labels_balanced_and_lesion_changes_the_lung():
    hu, labels = labeled_slices(0, 100000, 10, 64)
    assert labels.sum() == 5 and set(labels) == {0, 1}
    hu2, labels2 = labeled_slices(0, 100000, 10, 64)
    np.testing.assert_array_equal(hu, hu2)
    np.testing.assert_array_equal(labels, labels2)
    # a nodule is a small round change inside a lung, everything else stays
    p = patient_params(0, 100000)
    z = np.array([0.6], np.float32)
    nodule = random_nodule(p, 0.6, 64, np.random.default_rng(1))
    with_nodule = render_slices(p, z, 64, np.random.default_rng(2), [nodule])[0]
    without = render_slices(p, z, 64, np.random.default_rng(2), None)[0]
    changed = np.abs(with_nodule - without) > 50
    rows, cols = np.nonzero(changed)
    centre_col, centre_row = (nodule.u + 1) * 32 - 0.5, (nodule.v + 1) * 32 - 0.5
    assert changed.sum() >= 4 and changed.mean() < 0.03
    assert np.hypot(rows - centre_row, cols - centre_col).max() <= nodule.radius_px + 3
    # it sits in a lung: most of its footprint was air-filled parenchyma (the rest vessels), never
    # soft tissue, fat or bone, which are all above -200 HU
    footprint = np.hypot(*np.meshgrid(np.arange(64) - centre_row, np.arange(64) - centre_col, indexing="ij"))
    assert (without[footprint <= nodule.radius_px] < -500).mean() > 0.5


def test_written_tree_reads_back_the_generated_hu(phantom_set):
    series, skipped = scan_dicom_tree(phantom_set.dicom_dir)
    assert not skipped and len(series) == PHANTOM_KW["n_patients"]
    by_patient = {s.patient: s for s in series}
    for k in range(PHANTOM_KW["n_patients"]):
        truth, z_mm, _ = phantom_series(PHANTOM_KW["seed"], k, PHANTOM_KW["slices_per_series"], PHANTOM_KW["size"])
        s = by_patient[f"PHANTOM-{PHANTOM_KW['seed']}-{k:04d}"]
        np.testing.assert_allclose([h.position for h in s.slices], z_mm, atol=1e-3)
        for h, expected in zip(s.slices, truth):
            got, _ = read_slice_hu(h.path)
            np.testing.assert_allclose(got, expected, atol=0.5)


@pytest.mark.parametrize("representation", ["int16", "uint16"])
def test_dicom_headers_are_valid_ct(tmp_path, representation):
    hu, z, _ = phantom_series(1, 0, 3, 32)
    paths = write_dicom_series(tmp_path, hu, z, patient_id="P1", study_uid="1.2.3.4", series_uid="1.2.3.4.5",
                               pixel_representation=representation)
    ds = read(paths[0])
    assert ds.Modality == "CT" and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.preamble == b"\0" * 128
    assert (ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID) == ("P1", "1.2.3.4", "1.2.3.4.5")
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert float(ds.PixelSpacing[0]) == pytest.approx(360 / 32)
    assert float(ds.RescaleIntercept) == -1024 and float(ds.RescaleSlope) == 1
    assert ds.PixelRepresentation == (1 if representation == "int16" else 0)
    assert ds.pixel_array.dtype == (np.int16 if representation == "int16" else np.uint16)
    assert sorted(int(read(p).InstanceNumber) for p in paths) == [1, 2, 3]
    for i, p in enumerate(paths):
        got, _ = read_slice_hu(p)
        # uint16 stores HU -1024 as -1023 (stored 0 is the padding value)
        np.testing.assert_allclose(got, hu[i], atol=1.0 if representation == "uint16" else 0.5)
        assert read_header(p).position == pytest.approx(z[i], abs=1e-3)


def test_make_synthetic_ct_writes_a_loadable_labeled_csv(phantom_set):
    root = Path(phantom_set.root)
    info = json.loads((root / "phantom.json").read_text())
    assert info["seed"] == PHANTOM_KW["seed"] and info["n_slices"] == phantom_set.n_slices == 24
    with open(phantom_set.labels_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "label", "patient"]
    assert len(rows) == phantom_set.n_labeled == 36
    labels = np.array([int(r["label"]) for r in rows])
    assert 0.4 <= labels.mean() <= 0.6
    pretrain_patients = {p.name for p in Path(phantom_set.dicom_dir).iterdir()}
    assert not pretrain_patients & {r["patient"] for r in rows}
    splits = load_csv(phantom_set.labels_csv, size=32)
    x, y = splits["train"][0]
    assert x.shape == (1, 32, 32) and y in (0, 1)


def test_labeled_dicom_format_and_cli(tmp_path, capsys):
    out = make_synthetic_ct(tmp_path / "a", n_patients=1, slices_per_series=3, size=32, seed=5,
                            labeled_patients=2, labeled_slices_per_patient=4, labeled_format="dicom")
    with open(out.labels_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and all(r["path"].endswith(".dcm") for r in rows)
    hu, _ = read_slice_hu(str(Path(out.labels_csv).parent / rows[0]["path"]))
    assert hu.shape == (32, 32)
    assert main([str(tmp_path / "b"), "--patients", "2", "--slices", "3", "--size", "32", "--seed", "1",
                 "--no-labeled"]) == 0
    assert "2 series (6 slices)" in capsys.readouterr().out
    assert len(list((tmp_path / "b" / "dicom").rglob("*.dcm"))) == 6
    assert main([str(tmp_path / "c"), "--size", "8"]) == 2


def _lung_windowed_64(hu: np.ndarray) -> np.ndarray:
    """What fine-tuning sees at the toy scale: the lung-windowed PNG, 64 px, min-max scaled."""
    from ctssl.data.intensity import minmax_scale, resize_image
    from ctssl.data.phantom import window_to_uint8

    return minmax_scale(resize_image(window_to_uint8(hu).astype(np.float32), 64))


@pytest.mark.parametrize("patient", [100000, 100003, 100007])
def test_labeled_nodules_stay_visible_inside_the_lung_at_64_px(patient):
    from ctssl.data.phantom import nodule_profile, random_nodules

    p = patient_params(0, patient)
    rng = np.random.default_rng(patient)
    z = np.array([0.6], np.float32)
    nodules = random_nodules(p, 0.6, 128, rng)
    assert 1 <= len(nodules) <= 3
    with_nodules = render_slices(p, z, 128, np.random.default_rng(5), [nodules])[0]
    without = render_slices(p, z, 128, np.random.default_rng(5), None)[0]
    lung_128 = without < -600
    seen, lung_64 = _lung_windowed_64(with_nodules), resize_image_mask(lung_128)
    for nod in nodules:
        disc_128 = nodule_profile(nod, 128) > 0.5
        # in a lung field: air-filled parenchyma between vessels, never over bone
        assert lung_128[disc_128].mean() > 0.25 and without[disc_128].max() < 200
        # the same lesion on the 64 px grid: same centre, half the radius in pixels
        small = type(nod)(nod.u, nod.v, nod.radius_px / 2, nod.hu)
        assert small.radius_px >= 2.0
        inside = nodule_profile(small, 64) > 0.5
        d = nodule_profile(type(nod)(nod.u, nod.v, small.radius_px + 4, nod.hu), 64) > 0.5
        ring = d & ~(nodule_profile(type(nod)(nod.u, nod.v, small.radius_px + 1.5, nod.hu), 64) > 0.5) & lung_64
        assert inside.sum() >= 12 and ring.sum() >= 8
        # min-max units at 64 px: lung reads about 0.15, soft tissue about 0.9
        assert seen[inside].mean() - np.median(seen[ring]) > 0.3


def resize_image_mask(mask: np.ndarray) -> np.ndarray:
    """A 128 px mask on the 64 px grid: pixels at least mostly inside it."""
    from ctssl.data.intensity import resize_image

    return resize_image(mask.astype(np.float32), 64) > 0.5
