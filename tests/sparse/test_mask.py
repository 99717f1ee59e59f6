import pytest
import torch

from ctssl.sparse import PatchIndex, check_images, check_mask, num_visible, random_patch_mask
from ctssl.sparse.index import INACTIVE, OUTSIDE


def test_spark_rule_keeps_exact_count_per_image():
    m = random_patch_mask(16, (7, 7), 0.6, generator=torch.Generator().manual_seed(0))
    assert m.dtype == torch.bool and m.shape == (16, 7, 7)
    assert (m.flatten(1).sum(1) == round(49 * 0.4)).all()
    assert num_visible(49, 0.6) == 20


def test_mask_is_reproducible_from_seed_and_varies_otherwise():
    a = random_patch_mask(4, (4, 5), 0.6, generator=torch.Generator().manual_seed(3))
    b = random_patch_mask(4, (4, 5), 0.6, generator=torch.Generator().manual_seed(3))
    c = random_patch_mask(4, (4, 5), 0.6, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_mask_is_uniform_over_positions():
    m = random_patch_mask(4000, (2, 2), 0.5, generator=torch.Generator().manual_seed(0))
    freq = m.float().mean(0)
    assert torch.allclose(freq, torch.full((2, 2), 0.5), atol=0.03)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_mask_ratio_out_of_range(ratio):
    with pytest.raises(ValueError, match="mask_ratio"):
        random_patch_mask(1, (2, 2), ratio)


def test_patch_index_slots_and_neighbours():
    active = torch.tensor([[[True, False, True], [True, True, False]]])
    idx = PatchIndex(active)
    assert idx.num_patches == 4
    assert idx.slot.tolist() == [[[0, -1, 1], [2, 3, -1]]]
    assert idx.coords.tolist() == [[0, 0, 0], [0, 0, 2], [0, 1, 0], [0, 1, 1]]
    n0 = idx.neighbours[0]  # patch (0, 0): above and left are outside
    assert n0[0].tolist() == [OUTSIDE] * 3
    assert n0[:, 0].tolist() == [OUTSIDE] * 3
    assert n0[1, 1] == 0 and n0[1, 2] == INACTIVE and n0[2, 1] == 2 and n0[2, 2] == 3
    assert idx.dense_mask(16).shape == (1, 1, 4, 6)
    assert idx.dense_mask(16)[0, 0].tolist()[0] == [True, True, False, False, True, True]


def test_patch_index_stride_must_divide_patch():
    idx = PatchIndex(torch.ones(1, 1, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not divide"):
        idx.patch_side(3)


def test_check_images_and_mask_errors():
    images = torch.zeros(2, 3, 64, 96)
    check_mask(torch.ones(2, 2, 3, dtype=torch.bool), images)
    with pytest.raises(ValueError, match="multiples of 32"):
        check_images(torch.zeros(2, 3, 60, 64))
    with pytest.raises(ValueError, match=r"shape \(B, C, H, W\)"):
        check_images(torch.zeros(3, 64, 64))
    with pytest.raises(TypeError, match="floating-point"):
        check_images(torch.zeros(1, 3, 64, 64, dtype=torch.int32))
    bad = images.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        check_images(bad)
    with pytest.raises(TypeError, match="torch.bool"):
        check_mask(torch.ones(2, 2, 3), images)
    with pytest.raises(ValueError, match=r"\(2, 2, 3\)"):
        check_mask(torch.ones(2, 3, 2, dtype=torch.bool), images)
    with pytest.raises(TypeError, match="active must be"):
        check_mask([[True]], images)
