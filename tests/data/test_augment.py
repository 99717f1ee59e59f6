"""CT augmentations: shapes, value ranges, exact geometry, determinism with a seeded generator."""

from __future__ import annotations

import torch

from ctssl.data.augment import (
    Compose,
    GaussianBlur,
    GaussianNoise,
    IntensityJitter,
    MultiCropTransform,
    RandomHorizontalFlip,
    RandomResizedCrop,
    RandomRotation,
    RandomVerticalFlip,
    SparkTransform,
    TwoViewTransform,
    crop_box,
    gaussian_blur,
    gaussian_noise,
    intensity_jitter,
    random_resized_crop,
    rotate,
)


def image(channels=1, h=64, w=64):
    g = torch.Generator().manual_seed(0)
    return torch.rand(channels, h, w, generator=g)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_random_resized_crop_box_respects_scale_and_ratio():
    g = gen(1)
    for _ in range(50):
        top, left, h, w = crop_box(100, 80, (0.2, 0.5), (0.75, 1.333), g)
        assert 0 <= top and top + h <= 100 and 0 <= left and left + w <= 80
        assert 0.18 <= h * w / 8000 <= 0.52
        assert 0.7 <= w / h <= 1.4
    out = random_resized_crop(image(3, 50, 70), 32, (0.5, 1.0), generator=g)
    assert out.shape == (3, 32, 32)


def test_full_scale_crop_of_square_image_is_a_plain_resize():
    x = image(1, 48, 48)
    out = random_resized_crop(x, 48, scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=gen(0))
    assert torch.equal(out, x)


def test_flips_and_rotation_geometry():
    x = image(2, 16, 16)
    assert torch.equal(RandomHorizontalFlip(1.0)(x), x.flip(-1))
    assert torch.equal(RandomVerticalFlip(1.0)(x), x.flip(-2))
    assert torch.equal(RandomHorizontalFlip(0.0)(x), x)
    assert torch.equal(rotate(x, 0.0), x)
    # positive angles turn counter-clockwise as displayed (the torchvision convention)
    assert torch.allclose(rotate(x, 90.0), torch.rot90(x, k=1, dims=(-2, -1)), atol=1e-5)
    assert torch.allclose(rotate(x, -90.0), torch.rot90(x, k=-1, dims=(-2, -1)), atol=1e-5)
    small = RandomRotation(10.0)(x, generator=gen(3))
    assert small.shape == x.shape and float(small.min()) >= float(x.min()) - 1e-6


def test_corners_after_rotation_are_filled_with_the_minimum():
    x = torch.full((1, 32, 32), 0.7)
    out = rotate(x, 45.0)
    assert abs(float(out[0, 0, 0]) - 0.7) < 1e-6  # filled with min (= 0.7), not zeros
    assert float(rotate(x, 45.0, fill=0.0)[0, 0, 0]) < 0.1


def test_intensity_ops_stay_in_unit_range():
    x = image()
    for op in (lambda t: intensity_jitter(t, 0.5, 0.5, gen(1)), lambda t: gaussian_noise(t, 0.3, gen(2)),
               lambda t: gaussian_blur(t, 1.5)):
        y = op(x)
        assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
        assert not torch.equal(y, x)
    flat = torch.full((1, 20, 20), 0.3)
    assert torch.allclose(gaussian_blur(flat, 2.0), flat)
    blurred = gaussian_blur(x, 2.0)
    assert blurred.std() < 0.5 * x.std()
    assert abs(float(blurred.mean()) - float(x.mean())) < 0.01


def test_pipelines_shapes_and_ranges():
    x = image(1, 120, 100)
    spark = SparkTransform(64)(x, generator=gen(0))
    assert spark.shape == (1, 64, 64)
    views = TwoViewTransform(size=48)(x, generator=gen(0))
    assert isinstance(views, list) and len(views) == 2 and all(v.shape == (1, 48, 48) for v in views)
    assert not torch.equal(views[0], views[1])
    crops = MultiCropTransform(global_size=56, local_size=24, n_local=4)(x, generator=gen(0))
    assert [tuple(c.shape) for c in crops] == [(1, 56, 56)] * 2 + [(1, 24, 24)] * 4
    for v in [spark, *views, *crops]:
        assert float(v.min()) >= 0 and float(v.max()) <= 1 and v.dtype == torch.float32
    byol = TwoViewTransform(size=32, blur_p=(1.0, 0.0))
    assert byol.views[0].transforms[5].p == 1.0 and byol.views[1].transforms[5].p == 0.0


def test_seeded_generator_makes_augmentations_reproducible():
    x = image(3, 80, 80)
    pipe = Compose([RandomResizedCrop(40, (0.2, 1.0)), RandomHorizontalFlip(), RandomVerticalFlip(),
                    RandomRotation(15), IntensityJitter(0.4, 0.4, 1.0), GaussianBlur((0.1, 2.0), 1.0),
                    GaussianNoise(0.05, 1.0)])
    a = pipe(x, generator=gen(7))
    b = pipe(x, generator=gen(7))
    c = pipe(x, generator=gen(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    m1 = MultiCropTransform(48, 16, n_local=2)(x, generator=gen(1))
    m2 = MultiCropTransform(48, 16, n_local=2)(x, generator=gen(1))
    assert all(torch.equal(p, q) for p, q in zip(m1, m2))


def test_global_rng_is_used_without_a_generator():
    x = image()
    torch.manual_seed(5)
    a = SparkTransform(32)(x)
    torch.manual_seed(5)
    b = SparkTransform(32)(x)
    assert torch.equal(a, b)
