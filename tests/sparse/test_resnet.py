"""The masked ResNet encoders: torch backend == dense reference; torchvision compatibility."""
import pytest
import torch

from ctssl.models import create_resnet, resnet18, resnet50
from ctssl.sparse import BackendUnavailableError, random_patch_mask

from .helpers import assert_runs_match, edge_masks, rel_err, run_model

CASES = [  # (arch, batch, H, W): ResNet-18 covers sizes and batches, ResNet-50 the bottleneck path
    ("resnet18", 1, 64, 64),
    ("resnet18", 4, 64, 96),
    ("resnet18", 8, 64, 64),
    ("resnet18", 2, 128, 128),
    ("resnet50", 3, 64, 96),
]


@pytest.mark.parametrize("arch,batch,H,W", CASES)
@pytest.mark.parametrize("train", [True, False])
def test_torch_backend_equals_dense_float64(arch, batch, H, W, train):
    gen = torch.Generator().manual_seed(batch * 1000 + H + W)
    torch.manual_seed(0)
    model = create_resnet(arch).double().train(train)
    images = torch.randn(batch, 3, H, W, generator=gen, dtype=torch.float64)
    if batch == 1:
        masks = [random_patch_mask(1, (H // 32, W // 32), 0.6, generator=gen)]
    elif arch == "resnet50":
        masks = edge_masks(batch, H // 32, W // 32, gen)[1:2]  # random + an empty + a full image
    else:
        masks = edge_masks(batch, H // 32, W // 32, gen)
    for active in masks:
        ref = run_model(model, images, active, "dense")
        out = run_model(model, images, active, "torch", loss_weights=ref[4])
        assert_runs_match(ref, out, 1e-9)
        for m in ref[0]:
            assert torch.isfinite(m).all()


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torch_backend_float32_is_as_accurate_as_dense_float32(arch):
    """In float32 both layouts round differently; each must be as close to the float64 truth.

    Train-mode BN over few visible rows amplifies float32 rounding in the backward,
    so the packed result is judged against the float64 reference, next to the
    dense float32 emulation's own error.
    """
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(0)
    model = create_resnet(arch, in_chans=1).train()
    images = torch.randn(3, 1, 64, 64, generator=gen)
    active = edge_masks(3, 2, 2, gen)[1]
    truth = run_model(model.double(), images.double(), active, "dense")
    weights32 = [w.float() for w in truth[4]]
    model = model.float()
    dense32 = run_model(model, images, active, "dense", loss_weights=weights32)
    torch32 = run_model(model, images, active, "torch", loss_weights=weights32)

    def errors(out):
        errs = [rel_err(a, b) for a, b in zip(out[0], truth[0])] + [rel_err(out[1], truth[1])]
        errs += [rel_err(out[2][n], truth[2][n]) for n in truth[2]]
        return torch.tensor(errs)

    e_dense, e_torch = errors(dense32), errors(torch32)
    assert e_torch[:4].max() < 1e-3  # forward maps
    # BN over 5 visible rows at stride 32 makes both float32 paths lose ~2% in the
    # backward (measured); the packed path must stay within a small factor of that
    assert e_torch.max() <= 3 * e_dense.max() + 1e-4, (e_torch.max(), e_dense.max())


def test_masked_maps_are_zero_where_masked_and_have_stage_shapes():
    model = resnet50().eval()
    images = torch.randn(2, 3, 64, 96)
    active = random_patch_mask(2, (2, 3), 0.6, generator=torch.Generator().manual_seed(0))
    maps = model.forward_masked(images, active, "torch")
    assert [m.shape[1] for m in maps] == [256, 512, 1024, 2048]
    assert [tuple(m.shape[2:]) for m in maps] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    for m, s in zip(maps, (4, 8, 16, 32)):
        up = active.repeat_interleave(32 // s, 1).repeat_interleave(32 // s, 2).unsqueeze(1)
        assert (m * ~up).abs().max() == 0


def test_all_visible_mask_equals_dense_forward_in_eval():
    """With every patch visible, SparK's masked encoder is the ordinary encoder."""
    torch.manual_seed(0)
    model = resnet18().double().eval()
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    active = torch.ones(2, 2, 2, dtype=torch.bool)
    dense = model.forward_features(images)
    masked = model.forward_masked(images, active, "torch")
    for a, b in zip(masked, dense):
        assert rel_err(a, b) < 1e-12


def test_state_dict_is_torchvision_compatible():
    tv = pytest.importorskip("torchvision.models")
    for name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"):
        ours = create_resnet(name)
        theirs = getattr(tv, name)()
        assert list(ours.state_dict().keys()) == list(theirs.state_dict().keys()), name
        assert all(a.shape == b.shape for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    # weights move both ways with strict=True and give the same logits
    theirs = tv.resnet50().eval()
    ours = resnet50().eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    assert torch.allclose(ours(x), theirs(x), atol=1e-5)
    theirs.load_state_dict(resnet50().state_dict(), strict=True)


def test_bad_input_gives_clear_errors():
    model = resnet18()
    images = torch.randn(2, 3, 64, 64)
    active = torch.ones(2, 2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="multiples of 32"):
        model.forward_masked(torch.randn(2, 3, 60, 64), active)
    with pytest.raises(ValueError, match="active must have shape"):
        model.forward_masked(images, torch.ones(2, 3, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="dtype torch.bool"):
        model.forward_masked(images, active.float())
    with pytest.raises(ValueError, match="channels"):
        model.forward_masked(torch.randn(2, 1, 64, 64), active)
    bad = images.clone()
    bad[1, 2, 3, 4] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        model.forward_masked(bad, active)
    with pytest.raises(BackendUnavailableError, match="unknown backend 'nope'.*dense"):
        model.forward_masked(images, active, "nope")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="move the mask"):
            model.forward_masked(images, active.cuda())


def test_drop_path_rate_is_spread_over_blocks():
    model = resnet50(drop_path_rate=0.05)
    rates = [b.drop_path.p for layer in (model.layer1, model.layer2, model.layer3, model.layer4)
             for b in layer if b.drop_path is not None]
    assert len(rates) == 15 and abs(rates[-1] - 0.05) < 1e-9 and rates == sorted(rates)


def test_encoders_are_created_by_name_with_their_contract():
    from ctssl.models import create_encoder, encoder_names

    assert {"resnet18", "resnet50"} <= set(encoder_names())
    enc = create_encoder("resnet18", in_chans=1)
    assert (enc.patch_size, enc.spatial_dims, enc.in_chans) == (32, 2, 1)
    assert enc.feature_channels == (64, 128, 256, 512) and enc.feature_strides == (4, 8, 16, 32)
    with pytest.raises(ValueError, match="unknown encoder 'resnet17'; choose one of resnet18"):
        create_encoder("resnet17")
