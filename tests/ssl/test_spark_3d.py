"""SparK on volumes: n-d patchify and loss, dense = torch backend in float64 on random 3-D masks (forward and
gradients), the loss reads masked patches only, a volume with no visible patch, the 3-D decoder, visualisation."""
from __future__ import annotations

import copy

import pytest
import torch

from ctssl.models import BasicBlock, ResNet, resnet18_3d
from ctssl.models.decoder import LightDecoder
from ctssl.sparse import get_backend, random_patch_mask
from ctssl.ssl import create_method
from ctssl.ssl.spark import masked_patch_loss, patchify, unpatchify, upsample_mask

P = 32


def tiny_spark_3d(backend: str = "dense", seed: int = 0):
    """A one-block-per-stage 3-D ResNet with a narrow decoder: seconds per step on one core."""
    torch.manual_seed(seed)
    encoder = ResNet(BasicBlock, (1, 1, 1, 1), in_chans=1, spatial_dims=3)
    return create_method("spark", encoder, backend=backend, decoder_width=32)


def volumes(batch: int = 2, size: int | tuple[int, int, int] = 64, seed: int = 0) -> torch.Tensor:
    """Smooth random volumes in [0, 1] (patches have structure, so per-patch normalisation is well posed)."""
    sizes = (size,) * 3 if isinstance(size, int) else tuple(size)
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 1, *(s // 8 for s in sizes), generator=g)
    return torch.nn.functional.interpolate(coarse, size=sizes, mode="trilinear", align_corners=False)


FLAT = (64, 64, 32)
"""2 x 2 x 1 patches: SparK keeps round(4 * 0.4) = 2 per volume; half the work of a 64^3 volume."""


def test_patchify_roundtrip_and_order_3d():
    x = torch.randn(2, 2, 64, 32, 96)
    patches = patchify(x, P)
    assert patches.shape == (2, 2 * 1 * 3, 2 * P ** 3)
    # grid (1, 0, 2) of a 2x1x3 grid is patch 1*3 + 0*3 + 2 = 5
    assert torch.equal(patches[1, 5].view(2, P, P, P), x[1, :, 32:64, 0:32, 64:96])
    assert torch.equal(unpatchify(patches, P, tuple(x.shape)), x)


def test_loss_matches_direct_per_patch_formula_3d():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 1, 64, 32, 32, generator=g, dtype=torch.float64)
    rec = torch.randn(1, 1, 64, 32, 32, generator=g, dtype=torch.float64)
    active = torch.tensor([[[[True]], [[False]]]])  # (B, 2, 1, 1): the second (deeper) patch is masked
    patch = x[0, :, 32:64]
    n = patch.numel()
    target = (patch - patch.mean()) / torch.sqrt(((patch - patch.mean()) ** 2).sum() / (n - 1) + 1e-6)
    expected = float(((rec[0, :, 32:64] - target) ** 2).mean())
    assert float(masked_patch_loss(rec, x, active)) == pytest.approx(expected, rel=1e-12)


def test_loss_reads_masked_patches_only_3d():
    x = volumes(2).double()
    rec = torch.randn_like(x, requires_grad=True)
    active = random_patch_mask(2, (2, 2, 2), 0.6, generator=torch.Generator().manual_seed(0))
    masked_patch_loss(rec, x, active).backward()
    visible = upsample_mask(active, P).expand_as(rec)
    assert rec.grad[visible].abs().max() == 0
    assert (rec.grad[~visible].abs() > 0).double().mean() > 0.99


def _loss_and_grads(method, x, active):
    m = copy.deepcopy(method)
    loss = m(x, active=active)["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_torch_backend_gives_the_dense_loss_and_gradients_3d(seed=1):
    """float64, random SparK masks (2 of 4 patches visible per volume), every gradient."""
    m = tiny_spark_3d("dense", seed).double()
    x = volumes(2, FLAT, seed=seed).double()
    active = m.random_mask(x)
    assert active.shape == (2, 2, 2, 1) and active.sum(dim=(1, 2, 3)).tolist() == [2, 2]
    ref_loss, ref_grads = _loss_and_grads(m, x, active)
    m.backend = get_backend("torch")
    loss, grads = _loss_and_grads(m, x, active)
    assert torch.isfinite(ref_loss) and float(loss) == pytest.approx(float(ref_loss), rel=1e-12)
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        assert _rel_err(grads[name], ref) <= 1e-9, name


def test_a_volume_with_no_visible_patch(backend="torch"):
    """The second volume keeps no patch: its features are all mask token, the loss stays finite, and the torch
    backend agrees with the dense reference."""
    m = tiny_spark_3d("dense").double()
    x = volumes(2, FLAT, seed=2).double()
    active = torch.zeros(2, 2, 2, 1, dtype=torch.bool)
    active[0, 0, 1, 0] = active[0, 1, 0, 0] = True
    ref_loss, ref_grads = _loss_and_grads(m, x, active)
    m.backend = get_backend(backend)
    loss, grads = _loss_and_grads(m, x, active)
    assert torch.isfinite(loss) and float(loss) == pytest.approx(float(ref_loss), rel=1e-12)
    assert all(torch.isfinite(g).all() for g in grads.values())
    for name in ("backbone.conv1.weight", "mask_tokens.0", "mask_tokens.3", "decoder.proj.weight"):
        assert _rel_err(grads[name], ref_grads[name]) <= 1e-9, name


def test_3d_architecture_follows_the_encoder_widths():
    m = create_method("spark", resnet18_3d(in_chans=1), backend="dense", decoder_width=64)
    assert m.patch_size == 32 and m.input_dims == 3
    assert [type(n).__name__ for n in m.densify_norms] == ["BatchNorm3d"] * 4
    assert [tuple(p.weight.shape) for p in m.densify_projs[1:]] == [(32, 256, 3, 3, 3), (16, 128, 3, 3, 3),
                                                                   (8, 64, 3, 3, 3)]
    assert isinstance(m.decoder.blocks[0][0], torch.nn.ConvTranspose3d) and m.decoder.spatial_dims == 3
    out = m.decoder([torch.zeros(1, 64, 1, 1, 1)])
    assert out.shape == (1, 1, 32, 32, 32)


def test_decoder_rejects_2d_maps_in_3d():
    with pytest.raises(ValueError, match="3-D maps"):
        LightDecoder(64, 1, spatial_dims=3)([torch.zeros(1, 64, 2, 2)])
    with pytest.raises(ValueError, match="spatial_dims"):
        LightDecoder(64, 1, spatial_dims=4)


def test_visualize_shows_the_middle_slice_and_leaves_buffers():
    m = tiny_spark_3d("torch")
    x = volumes(2, seed=4)
    active = m.random_mask(x)
    before = {n: b.clone() for n, b in m.named_buffers()}
    grid = m.visualize(x, active=active)
    assert grid.shape == (6, 1, 64, 64) and 0 <= grid.min() and grid.max() <= 1
    middle = x[:, :, 32]
    visible = upsample_mask(active, P)[:, :, 32]
    assert torch.equal(grid[:2], middle) and torch.equal(grid[2:4], middle * visible)
    for n, b in m.named_buffers():
        assert torch.equal(b, before[n]), n


def test_bad_volume_inputs_fail_clearly():
    m = tiny_spark_3d("dense")
    with pytest.raises(TypeError, match="volume tensor"):
        m(torch.rand(2, 1, 64, 64))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        m.random_mask(torch.rand(1, 1, 64, 48, 64))
    crops = m.train_transform(64)(torch.rand(1, 80, 72, 64), generator=torch.Generator().manual_seed(0))
    assert crops.shape == (1, 64, 64, 64)


def test_named_2d_only_backend_is_refused_at_construction_and_auto_avoids_it(monkeypatch):
    from ctssl.sparse import BackendUnavailableError
    from ctssl.sparse.backends.base import Backend
    from ctssl.ssl import spark as spark_module

    class Flat(type(get_backend("torch"))):
        """The torch backend claiming 2-D grids only, like the cuda and minkowski backends."""

        name = "flat"
        spatial_dims = (2,)

    real = spark_module.get_backend

    def fake_get_backend(name, *args, **kwargs):
        return Flat() if name in ("flat", "auto") else real(name, *args, **kwargs)

    monkeypatch.setattr(spark_module, "get_backend", fake_get_backend)
    encoder = ResNet(BasicBlock, (1, 1, 1, 1), in_chans=1, spatial_dims=3)
    with pytest.raises((BackendUnavailableError, ValueError), match="3-D"):
        create_method("spark", encoder, backend="flat", decoder_width=32)
    m = create_method("spark", encoder, backend="auto", decoder_width=32)
    engine = m.engine(torch.device("cpu"))
    assert isinstance(engine, Backend) and engine.name == "torch"
