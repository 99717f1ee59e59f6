"""HU = RescaleSlope * stored + RescaleIntercept with a slope other than 1 (every other fixture has slope 1),
through the reader and through ctssl-prepare's store."""

from __future__ import annotations

import numpy as np
import pytest

from ctssl.data.dicom import AIR_HU, LOWEST_TISSUE_HU, read_slice_hu
from ctssl.data.prepare import prepare_store
from ctssl.data.store import SliceStore

from .helpers import read


@pytest.mark.parametrize("slope,intercept", [(2.0, -2048.0), (0.5, -1024.0)])
def test_hu_is_slope_times_stored_plus_intercept(tmp_path, ct_small, slope, intercept):
    ds = read(ct_small)
    del ds.PixelPaddingValue  # every pixel is data: the formula alone decides
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    (tmp_path / "dicom").mkdir()
    path = tmp_path / "dicom" / "slope.dcm"
    ds.save_as(str(path))
    stored = read(path).pixel_array.astype(np.float64)
    expected = slope * stored + intercept
    expected[expected < LOWEST_TISSUE_HU] = AIR_HU  # below any tissue: air, as for slope 1
    assert (expected != AIR_HU).mean() > 0.5  # most pixels test the formula, not the air rule

    hu, _ = read_slice_hu(str(path))
    np.testing.assert_array_equal(hu.astype(np.float64), expected)

    prepare_store(tmp_path / "dicom", tmp_path / "store", progress=False)
    store = SliceStore(tmp_path / "store")
    assert len(store) == 1
    np.testing.assert_array_equal(store.read_hu(0), np.rint(expected).astype(np.int16))
