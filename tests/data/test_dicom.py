"""DICOM reading: real pydicom CT files to HU, series grouping and sorting, per-file skip reasons."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pydicom
import pytest

from ctssl.data import dicom
from ctssl.data.dicom import (
    AIR_HU,
    SkippedFile,
    SliceHeader,
    SliceReadError,
    group_series,
    read_header,
    read_slice_hu,
    scan_dicom_tree,
    slice_normal,
    sort_slices,
)

from .helpers import copy_testdata, decoder_available, hu_of, pydicom_file, read, write_with_transfer_syntax


def test_ct_small_reads_to_pydicom_hu_with_spacing(ct_small):
    hu, ds = read_slice_hu(ct_small)
    ref = hu_of(read(ct_small))
    assert hu.dtype == np.float32 and hu.shape == (128, 128)
    # CT_small has no padding pixels, so every value equals pydicom's modality LUT result
    assert (ref >= -1024).all()
    np.testing.assert_allclose(hu, ref, atol=1e-3)
    header = read_header(ct_small)
    assert isinstance(header, SliceHeader)
    assert header.spacing == pytest.approx((0.661468, 0.661468))
    assert (header.rows, header.columns) == (128, 128)
    # IOP is axial, so the position along the normal is ImagePositionPatient z
    assert header.position == pytest.approx(-75.699997)


@pytest.mark.parametrize("name", ["693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm"])
def test_jpeg2000_ct_maps_padding_and_out_of_fov_to_air(name):
    path = pydicom_file(name)
    header = read_header(path)
    assert isinstance(header, SliceHeader)
    if not decoder_available(header.transfer_syntax):
        with pytest.raises(SliceReadError, match="install a decoder: pip install"):
            read_slice_hu(path)
        return
    if int(pydicom.__version__.split(".")[0]) < 3 and int(np.__version__.split(".")[0]) >= 2:
        pytest.skip("pydicom 2's Pillow JPEG 2000 handler overflows int16 under numpy 2")
    hu, _ = read_slice_hu(path)
    ref = hu_of(read(path))
    tissue = ref >= -1024
    assert (~tissue).sum() > 1000  # these files carry out-of-FOV pixels (-2000 raw)
    np.testing.assert_allclose(hu[tissue], ref[tissue], atol=1e-3)
    assert (hu[~tissue] == AIR_HU).all()
    assert hu.min() >= -1024


def test_gantry_tilt_position_uses_the_slice_normal():
    path = pydicom_file("J2K_pixelrep_mismatch.dcm")  # IOP rows (1,0,0), columns (0,0.9272,-0.3746)
    ds = read(path)
    normal = slice_normal([float(v) for v in ds.ImageOrientationPatient])
    assert np.linalg.norm(normal) == pytest.approx(1.0)
    expected = float(np.dot([float(v) for v in ds.ImagePositionPatient], normal))
    header = read_header(path)
    assert header.position == pytest.approx(expected)
    assert header.position != pytest.approx(float(ds.ImagePositionPatient[2]))


def test_non_ct_and_non_image_files_are_skipped_with_reasons(tmp_path):
    mr = read_header(pydicom_file("MR_small.dcm"))
    assert isinstance(mr, SkippedFile) and mr.reason == "modality MR, not CT"
    (tmp_path / "notes.xml").write_text("<LidcReadMessage/>")
    assert read_header(str(tmp_path / "notes.xml")).reason == "not a DICOM file"
    dicomdir = read_header(pydicom_file("DICOMDIR"))
    assert isinstance(dicomdir, SkippedFile) and "DICOMDIR" in dicomdir.reason
    # a CT file of pydicom's tiny DICOMDIR series has no pixel data
    tiny = pydicom_file("dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM000000")
    assert "no pixel data" in read_header(tiny).reason
    rtdose = read_header(pydicom_file("rtdose.dcm"))
    assert isinstance(rtdose, SkippedFile) and "not CT" in rtdose.reason


def test_series_grouped_and_sorted_by_position_from_pydicom_series():
    # pydicom ships a 5-slice 16x16 CT series (CT5N) and a 2-slice one (CT2N) of the same patient
    root = pydicom_file("dicomdirtests/98892001/CT5N/2062").rsplit("/", 2)[0]
    series, skipped = scan_dicom_tree(root)
    sizes = sorted(len(s.slices) for s in series)
    assert sizes == [2, 5]
    five = next(s for s in series if len(s.slices) == 5)
    positions = [s.position for s in five.slices]
    assert positions == sorted(positions) and len(set(positions)) == 5
    assert not skipped
    series, skipped = scan_dicom_tree(root, min_files=3)
    assert [len(s.slices) for s in series] == [5]
    assert len(skipped) == 2 and all("fewer than min_files=3" in s.reason for s in skipped)


def test_phantom_series_sorted_along_normal_not_by_file_name(phantom_set):
    series, skipped = scan_dicom_tree(phantom_set.dicom_dir)
    assert len(series) == 3 and not skipped
    for s in series:
        positions = [h.position for h in s.slices]
        instances = [h.instance for h in s.slices]
        assert positions == sorted(positions)
        # the writer numbers instances head first, so instance numbers fall as position rises
        assert instances == sorted(instances, reverse=True)


def _header(path, position, instance, rows=4, sop=None):
    return SliceHeader(path=path, patient="p", study="st", series="se", sop_instance=sop or path, rows=rows,
                       columns=rows, position=position, instance=instance, spacing=(1.0, 1.0), thickness=1.0,
                       transfer_syntax="1.2.840.10008.1.2.1")


def test_sorting_falls_back_to_instance_number_then_path():
    by_pos = sort_slices([_header("a", 3.0, 1), _header("b", -1.0, 2), _header("c", 1.0, 3)])
    assert [h.path for h in by_pos] == ["b", "c", "a"]
    by_instance = sort_slices([_header("a", None, 3), _header("b", 1.0, 1), _header("c", 2.0, 2)])
    assert [h.path for h in by_instance] == ["b", "c", "a"]
    by_path = sort_slices([_header("c", None, None), _header("a", None, 5), _header("b", 1.0, None)])
    assert [h.path for h in by_path] == ["a", "b", "c"]


def test_group_series_drops_duplicates_and_odd_sizes():
    items = [_header("a", 0.0, 1), _header("b", 1.0, 2), _header("c", 2.0, 3, rows=8),
             _header("d", 3.0, 4, sop="a"), SkippedFile("x", "not a DICOM file")]
    series, skipped = group_series(items)
    assert [h.path for h in series[0].slices] == ["a", "b"]
    reasons = {s.path: s.reason for s in skipped}
    assert reasons["c"] == "slice size 8x8 differs from the series' 4x4"
    assert reasons["d"].startswith("duplicate SOPInstanceUID")
    assert reasons["x"] == "not a DICOM file"


def test_missing_rescale_means_identity_and_is_logged_once(tmp_path, ct_small, caplog, monkeypatch):
    ds = read(ct_small)
    del ds.RescaleSlope
    del ds.RescaleIntercept
    del ds.PixelPaddingValue
    paths = []
    for k in range(2):
        ds.SOPInstanceUID = f"{ds.SOPInstanceUID[:50]}.{k}"
        paths.append(tmp_path / f"{k}.dcm")
        ds.save_as(str(paths[-1]))
    monkeypatch.setattr(dicom, "_warned_missing_rescale", False)
    with caplog.at_level(logging.WARNING, logger="ctssl.data.dicom"):
        hu0, _ = read_slice_hu(str(paths[0]))
        read_slice_hu(str(paths[1]))
    raw = read(paths[0]).pixel_array.astype(np.float32)
    kept = raw >= -1024
    np.testing.assert_array_equal(hu0[kept], raw[kept])
    messages = [r.getMessage() for r in caplog.records if "RescaleSlope" in r.getMessage()]
    assert len(messages) == 1 and "slope 1, intercept 0" in messages[0]


def test_pixel_padding_value_becomes_air(tmp_path, ct_small):
    ds = read(ct_small)
    arr = ds.pixel_array.copy()
    arr[:5, :] = -2000  # the file declares PixelPaddingValue -2000
    ds.PixelData = arr.tobytes()
    ds.save_as(str(tmp_path / "pad.dcm"))
    hu, _ = read_slice_hu(str(tmp_path / "pad.dcm"))
    assert (hu[:5] == AIR_HU).all()
    np.testing.assert_allclose(hu[5:], hu_of(read(ct_small))[5:], atol=1e-3)


def test_undecodable_transfer_syntaxes_give_reasons_with_install_hints(tmp_path, ct_small):
    fake = write_with_transfer_syntax(ct_small, tmp_path / "fake.dcm", "1.2.3.4.5.6.7")
    with pytest.raises(SliceReadError, match=r"unsupported transfer syntax 1\.2\.3\.4\.5\.6\.7"):
        read_slice_hu(str(fake))
    jpegls = "1.2.840.10008.1.2.4.80"
    garbage = write_with_transfer_syntax(ct_small, tmp_path / "jls.dcm", jpegls, encapsulate=True)
    with pytest.raises(SliceReadError) as info:
        read_slice_hu(str(garbage))
    assert "JPEG-LS" in str(info.value)
    if not decoder_available(jpegls):
        assert "install a decoder: pip install pyjpegls" in str(info.value)


def test_truncated_file_reports_truncation(tmp_path, ct_small):
    data = open(ct_small, "rb").read()
    (tmp_path / "cut.dcm").write_bytes(data[:-5000])
    assert isinstance(read_header(str(tmp_path / "cut.dcm")), SliceHeader)  # the header is intact
    with pytest.raises(SliceReadError, match="truncated pixel data"):
        read_slice_hu(str(tmp_path / "cut.dcm"))
    (tmp_path / "stub.dcm").write_bytes(data[:600])
    assert isinstance(read_header(str(tmp_path / "stub.dcm")), SkippedFile)


def test_min_files_preset_matches_paper():
    assert dicom.PAPER_MIN_FILES == 11


def test_copied_ct_small_in_tree_is_one_series(tmp_path):
    for k in range(3):
        (tmp_path / f"d{k}").mkdir()
    copy_testdata("CT_small.dcm", tmp_path / "d0" / "a.dcm")
    copy_testdata("MR_small.dcm", tmp_path / "d1" / "b.dcm")
    shutil.copy(pydicom_file("CT_small.dcm"), tmp_path / "d2" / "dup.dcm")
    series, skipped = scan_dicom_tree(tmp_path)
    assert len(series) == 1 and len(series[0].slices) == 1
    assert sorted(s.reason.split(" of ")[0] for s in skipped) == ["duplicate SOPInstanceUID", "modality MR, not CT"]
