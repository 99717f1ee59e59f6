"""SparK: masked-only loss, per-patch normalisation, backend agreement, densify, decoder, visualisation."""
from __future__ import annotations

import copy

import pytest
import torch

from ctssl.models import BasicBlock, ResNet, resnet18, resnet50
from ctssl.models.decoder import LightDecoder
from ctssl.sparse import BackendUnavailableError, get_backend
from ctssl.ssl import create_method
from ctssl.ssl.spark import masked_patch_loss, patchify, unpatchify

from .helpers import images, tiny_method


def fixed_mask(batch: int = 2) -> torch.Tensor:
    """2x2 patch grids with a different visible set per image (SparK keeps 2 of 4 at ratio 0.6)."""
    active = torch.tensor([[[True, False], [False, True]], [[False, True], [True, False]]])
    return active.repeat(batch // 2, 1, 1)


def upsample(active: torch.Tensor, p: int = 32) -> torch.Tensor:
    return active.repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1)


def test_patchify_roundtrip_and_order():
    x = torch.randn(2, 3, 64, 96)
    patches = patchify(x, 32)
    assert patches.shape == (2, 6, 3 * 32 * 32)
    assert torch.equal(patches[1, 4].view(3, 32, 32), x[1, :, 32:64, 32:64])  # grid (1, 1) of a 2x3 grid
    assert torch.equal(unpatchify(patches, 32, tuple(x.shape)), x)


def test_loss_matches_direct_per_patch_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 2, 64, 64, generator=g)
    rec = torch.randn(2, 2, 64, 64, generator=g)
    active = fixed_mask()
    total, count = 0.0, 0
    for b in range(2):
        for i in range(2):
            for j in range(2):
                if active[b, i, j]:
                    continue
                patch = x[b, :, 32 * i:32 * i + 32, 32 * j:32 * j + 32].double()
                n = patch.numel()
                mean = patch.sum() / n
                var = ((patch - mean) ** 2).sum() / (n - 1)
                target = (patch - mean) / torch.sqrt(var + 1e-6)
                pred = rec[b, :, 32 * i:32 * i + 32, 32 * j:32 * j + 32].double()
                total += float(((pred - target) ** 2).mean())
                count += 1
    assert count == 4
    assert masked_patch_loss(rec, x, active) == pytest.approx(total / count, rel=1e-5)


def test_loss_reads_masked_patches_only():
    """Changing the reconstruction on visible patches leaves the loss unchanged; on masked ones it does not."""
    x = images(2)
    rec = torch.randn_like(x, requires_grad=True)
    active = fixed_mask()
    loss = masked_patch_loss(rec, x, active)
    loss.backward()
    visible = upsample(active)
    assert rec.grad[visible.expand_as(rec)].abs().max() == 0
    assert (rec.grad[~visible.expand_as(rec)].abs() > 0).float().mean() > 0.99
    noise = torch.randn_like(x)
    with torch.no_grad():
        assert masked_patch_loss(rec + noise * visible, x, active) == loss
        assert masked_patch_loss(rec + noise * ~visible, x, active) != loss


@pytest.mark.parametrize("backend", ["dense", "torch"])
def test_encoder_never_sees_masked_pixels(backend):
    """Editing the image inside masked patches changes the target, not the reconstruction."""
    m = tiny_method("spark", backend=backend)
    x = images(2)
    active = fixed_mask()
    edited = torch.where(upsample(active), x, torch.rand_like(x))
    with torch.no_grad():
        rec_a, rec_b = m.reconstruct(x, active), m.reconstruct(edited, active)
        torch.testing.assert_close(rec_a, rec_b, rtol=1e-5, atol=1e-6)
        assert m(x, active=active)["loss"] != m(edited, active=active)["loss"]
    edited_visible = torch.where(upsample(active), torch.rand_like(x), x)
    with torch.no_grad():
        assert not torch.allclose(m.reconstruct(edited_visible, active), rec_a)


def _loss_and_grads(method, x, active):
    m = copy.deepcopy(method)
    loss = m(x, active=active)["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}


def _backend_or_skip(name: str):
    try:
        return get_backend(name)
    except BackendUnavailableError as exc:
        pytest.skip(f"backend {name!r} unavailable here: {exc}")


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


ACTIVE_2_AND_1 = torch.tensor([[[True, False], [True, False]], [[False, False], [False, True]]])  # 2 and 1 visible


def test_torch_backend_gives_the_dense_loss_and_gradients():
    """float64: BN over the few visible positions of a 64x64 batch amplifies float32 rounding in the
    backward pass to ~1e-1 relative (for the dense backend against itself reordered, too)."""
    m = tiny_method("spark", backend="dense").double()
    x = images(2, seed=3).double()
    ref_loss, ref_grads = _loss_and_grads(m, x, ACTIVE_2_AND_1)
    m.backend = get_backend("torch")
    loss, grads = _loss_and_grads(m, x, ACTIVE_2_AND_1)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-12)
    assert grads.keys() == ref_grads.keys()
    for name in ("backbone.conv1.weight", "backbone.layer3.0.conv1.weight", "backbone.bn1.weight", "mask_tokens.0",
                 "mask_tokens.3", "densify_norms.0.weight", "decoder.proj.weight"):
        assert _rel_err(grads[name], ref_grads[name]) <= 1e-9, name


def test_triton_backend_gives_the_dense_loss():
    """Forward only, float32 (the kernels' types), one block per stage: the Triton interpreter is slow;
    the engine's own tests compare the Triton backward with the dense one."""
    be = _backend_or_skip("triton")
    torch.manual_seed(0)
    m = create_method("spark", ResNet(BasicBlock, (1, 1, 1, 1), in_chans=1), backend="dense", decoder_width=64)
    x = images(2, seed=3)
    with torch.no_grad():
        ref = m(x, active=ACTIVE_2_AND_1)["loss"]
        m.backend = be
        loss = m(x, active=ACTIVE_2_AND_1)["loss"]
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)


@pytest.mark.parametrize("backend", ["dense", "torch"])
def test_densify_puts_the_token_exactly_at_masked_positions(backend):
    m = tiny_method("spark", backend=backend)
    x = images(2)
    active = fixed_mask()
    features = m.backbone.forward_masked(x, active, backend, return_sparse=True)
    for stage, f in enumerate(reversed(features)):
        f = f.with_values(f.values.detach())
        bn_dense = m.densify_norms[stage](f).to_dense()
        filled = m.fill_masked(stage, f)
        assert filled.shape == bn_dense.shape
        p = f.patch_side
        visible = upsample(active, p).expand_as(filled)
        token = m.mask_tokens[stage].view(1, -1, 1, 1).expand_as(filled)
        assert torch.equal(filled[~visible], token[~visible])
        torch.testing.assert_close(filled[visible], bn_dense[visible])
        # the token is learned: its gradient comes from masked positions only
        (filled * torch.randn_like(filled)).sum().backward()
        assert m.mask_tokens[stage].grad.abs().sum() > 0


@pytest.mark.parametrize("shape", [(2, 1, 64, 64), (1, 3, 96, 128)])
def test_reconstruction_has_the_image_shape(shape):
    torch.manual_seed(0)
    m = create_method("spark", resnet18(in_chans=shape[1]), backend="torch", decoder_width=64)
    x = torch.rand(shape)
    with torch.no_grad():
        assert m.reconstruct(x, m.random_mask(x)).shape == shape


def test_paper_architecture_for_resnet50_and_resnet18():
    m50 = create_method("spark", resnet50(), backend="dense")
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in m50.densify_projs] == [
        (2048, 768, (1, 1)), (1024, 384, (3, 3)), (512, 192, (3, 3)), (256, 96, (3, 3))]
    assert [t.numel() for t in m50.mask_tokens] == [2048, 1024, 512, 256]
    assert m50.decoder.widths == [768, 384, 192, 96, 48, 24]
    assert m50.decoder.proj.out_channels == 3
    m18 = create_method("spark", resnet18(in_chans=1), backend="dense")
    assert [(c.in_channels, c.out_channels) for c in m18.densify_projs] == [
        (512, 768), (256, 384), (128, 192), (64, 96)]
    assert m18.decoder.proj.out_channels == 1
    block = m18.decoder.blocks[0]
    assert [type(layer).__name__ for layer in block] == ["ConvTranspose2d", "Conv2d", "BatchNorm2d", "ReLU6", "Conv2d",
                                                         "BatchNorm2d"]
    assert (block[0].kernel_size, block[0].stride) == ((4, 4), (2, 2))


def test_decoder_rejects_wrong_feature_widths():
    dec = LightDecoder(64, out_chans=1)
    with pytest.raises(ValueError, match="feature 1"):
        dec([torch.zeros(1, 64, 2, 2), torch.zeros(1, 16, 4, 4)])


def test_mask_keeps_sparks_count():
    m = tiny_method("spark")
    x = torch.rand(3, 1, 160, 160)  # 25 patches: round(25 * 0.4) = 10 visible
    assert m.random_mask(x).sum(dim=(1, 2)).tolist() == [10, 10, 10]


def test_visualize_rows_and_no_side_effects():
    m = tiny_method("spark")
    x = images(2)
    active = fixed_mask()
    before = {n: b.clone() for n, b in m.named_buffers()}
    grid = m.visualize(x, active=active)
    assert grid.shape == (6, 1, 64, 64) and grid.min() >= 0 and grid.max() <= 1
    visible = upsample(active)
    assert torch.equal(grid[:2], x)
    assert torch.equal(grid[2:4], x * visible)
    assert torch.equal(grid[4:][visible.expand_as(x)], x[visible.expand_as(x)])
    assert not torch.allclose(grid[4:][~visible.expand_as(x)], x[~visible.expand_as(x)])
    for n, b in m.named_buffers():
        assert torch.equal(b, before[n]), n


def test_bad_inputs_fail_clearly():
    m = tiny_method("spark")
    with pytest.raises(TypeError, match="image tensor"):
        m([torch.rand(2, 1, 64, 64)])
    with pytest.raises(ValueError, match="multiple of the patch size"):
        m.train_transform(100)
    with pytest.raises(ValueError, match="channels"):
        m(torch.rand(2, 3, 64, 64))
    with pytest.raises(BackendUnavailableError, match="unknown backend"):
        create_method("spark", resnet18(), backend="nope")
