"""Intensity modes, resampling and resizing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ctssl.data.intensity import (
    WINDOW_PRESETS,
    apply_intensity,
    minmax_scale,
    parse_intensity,
    resample_to_spacing,
    resize_image,
    resize_shorter_and_center_crop,
    slice_to_tensor,
    to_channels,
    window_hu,
)


def test_raw_mode_is_per_slice_min_max_of_hu():
    hu = np.array([[-1000, 0], [500, 1000]], np.int16)
    out = apply_intensity(hu, "raw")
    np.testing.assert_allclose(out, [[0.0, 0.5], [0.75, 1.0]])
    assert out.dtype == np.float32
    assert (minmax_scale(np.full((3, 3), 7.0)) == 0).all()


@pytest.mark.parametrize("name", sorted(WINDOW_PRESETS))
def test_window_presets_map_the_window_onto_0_1(name):
    level, width = WINDOW_PRESETS[name]
    hu = np.array([level - width, level - width / 2, level, level + width / 2, level + width], np.float32)
    np.testing.assert_allclose(apply_intensity(hu, name), [0, 0, 0.5, 1, 1], atol=1e-6)


def test_custom_window_forms_agree_and_bad_modes_fail():
    hu = np.linspace(-1200, 1200, 50, dtype=np.float32)
    a = apply_intensity(hu, "window:-600,1500")
    np.testing.assert_array_equal(a, apply_intensity(hu, (-600, 1500)))
    np.testing.assert_array_equal(a, apply_intensity(hu, "lung"))
    np.testing.assert_array_equal(a, window_hu(hu, -600, 1500))
    assert parse_intensity("raw") is None
    with pytest.raises(ValueError, match="unknown intensity mode"):
        parse_intensity("softtissue")
    with pytest.raises(ValueError, match="width must be positive"):
        parse_intensity((40, 0))
    with pytest.raises(ValueError, match="window:LEVEL,WIDTH"):
        parse_intensity("window:40")


@pytest.mark.parametrize("shape,out", [((48, 48), (32, 32)), ((40, 50), (64, 20)), ((3, 17, 23), (30, 11))])
def test_numpy_resize_matches_torch_bilinear(shape, out):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    got = resize_image(x, out)
    down = out[0] < shape[-2] or out[1] < shape[-1]
    ref = F.interpolate(torch.from_numpy(x).reshape(1, -1, *shape[-2:]), size=out, mode="bilinear",
                        align_corners=False, antialias=down).reshape(got.shape).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4)
    np.testing.assert_allclose(resize_image(torch.from_numpy(x), out).numpy(), ref, atol=1e-5)


def test_resample_to_spacing_keeps_physical_size():
    img = np.zeros((100, 80), np.float32)
    img[40:60, 30:50] = 1.0  # a 20 x 20 px square at 0.5 mm = 10 mm
    out, spacing = resample_to_spacing(img, (0.5, 0.5), 1.0)
    assert out.shape == (50, 40)
    assert spacing == pytest.approx((1.0, 1.0))
    assert out.sum() == pytest.approx(100.0, rel=0.05)  # 10 mm x 10 mm at 1 mm pixels
    out2, spacing2 = resample_to_spacing(img, (0.7, 0.7), 1.0)
    assert out2.shape == (70, 56)
    assert spacing2[0] * out2.shape[0] == pytest.approx(0.7 * 100)


def test_resize_crop_and_channels():
    img = np.arange(60 * 40, dtype=np.float32).reshape(60, 40) / (60 * 40)
    out = resize_shorter_and_center_crop(img, 20)
    assert out.shape == (20, 20)
    t = to_channels(img, 3)
    assert t.shape == (3, 60, 40) and torch.equal(t[0], t[2])
    with pytest.raises(ValueError):
        to_channels(img, 2)
    x = slice_to_tensor(np.linspace(-1000, 1000, 64 * 64).reshape(64, 64), intensity="lung", channels=3, size=32,
                        spacing=(0.5, 0.5), target_spacing=1.0)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
