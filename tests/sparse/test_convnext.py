"""The masked ConvNeXt encoders: torch backend == dense reference in float64; timm and official keys."""
import re

import pytest
import torch

from ctssl.models import ConvNeXt, convnext_tiny, create_encoder, encoder_names
from ctssl.sparse import random_patch_mask
from ctssl.sparse.backends.base import CONVNEXT_OPS

from .helpers import assert_runs_match, edge_masks, rel_err, run_model

ARCHS = ("convnext_tiny", "convnext_small", "convnext_base", "convnext_large")


def _small(**kwargs) -> ConvNeXt:
    """A ConvNeXt with every kind of layer but fewer and narrower blocks (fast float64 tests)."""
    return ConvNeXt((1, 1, 2, 1), (16, 24, 32, 40), **kwargs)


def _randomize(model: ConvNeXt) -> ConvNeXt:
    """Layer scales near 1 and non-trivial norms, so every branch matters in the comparison."""
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=gen, dtype=p.dtype) + 0.5)
            elif "norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


@pytest.mark.parametrize("train", [True, False])
def test_small_convnext_torch_equals_dense_float64(train):
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    model = _randomize(_small(drop_path_rate=0.0).double()).train(train)
    images = torch.randn(3, 3, 64, 96, generator=gen, dtype=torch.float64)
    for active in edge_masks(3, 2, 3, gen):
        ref = run_model(model, images, active, "dense")
        out = run_model(model, images, active, "torch", loss_weights=ref[4])
        assert_runs_match(ref, out, 1e-9)
        assert len(ref[2]) == sum(1 for n, _ in model.named_parameters() if not n.startswith("head."))
        for m in ref[0]:
            assert torch.isfinite(m).all()


def test_convnext_tiny_torch_equals_dense_float64():
    """The real ConvNeXt-T (28M parameters) at 32 x 64 px: one image without a visible patch, one with
    one of its two patches visible (its 7x7 convs read the masked one and the border)."""
    gen = torch.Generator().manual_seed(4)
    torch.manual_seed(0)
    model = _randomize(convnext_tiny().double()).train()
    images = torch.randn(2, 3, 32, 64, generator=gen, dtype=torch.float64)
    active = torch.tensor([[[False, False]], [[False, True]]])
    ref = run_model(model, images, active, "dense")
    out = run_model(model, images, active, "torch", loss_weights=ref[4])
    assert_runs_match(ref, out, 1e-9)
    assert len(ref[2]) == 178  # every parameter but the classifier head's four
    assert ref[1][1].abs().sum() > 0 and ref[1][0].abs().max() == 0  # image gradient only where visible


def test_drop_path_is_per_sample_and_the_same_on_every_backend():
    """Stochastic depth draws one keep/drop per image; with the same RNG state both backends agree."""
    gen = torch.Generator().manual_seed(5)
    model = _randomize(_small(drop_path_rate=0.5).double()).train()
    images = torch.randn(4, 3, 64, 64, generator=gen, dtype=torch.float64)
    active = random_patch_mask(4, (2, 2), 0.5, generator=gen)
    torch.manual_seed(7)
    ref = run_model(model, images, active, "dense")
    torch.manual_seed(7)
    out = run_model(model, images, active, "torch", loss_weights=ref[4])
    assert_runs_match(ref, out, 1e-9)


def test_masked_maps_are_zero_where_masked_and_have_stage_shapes():
    model = _small().eval()
    images = torch.randn(2, 3, 64, 96)
    active = random_patch_mask(2, (2, 3), 0.6, generator=torch.Generator().manual_seed(0))
    maps = model.forward_masked(images, active, "torch")
    assert [m.shape[1] for m in maps] == [16, 24, 32, 40]
    assert [tuple(m.shape[2:]) for m in maps] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    for m, s in zip(maps, (4, 8, 16, 32)):
        up = active.repeat_interleave(32 // s, 1).repeat_interleave(32 // s, 2).unsqueeze(1)
        assert (m * ~up).abs().max() == 0 and m.abs().sum() > 0


def test_all_visible_mask_equals_dense_forward():
    """With every patch visible, SparK's masked encoder is the ordinary encoder."""
    torch.manual_seed(0)
    model = _randomize(_small().double()).eval()
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    active = torch.ones(2, 2, 2, dtype=torch.bool)
    for backend in ("dense", "torch"):
        for a, b in zip(model.forward_masked(images, active, backend), model.forward_features(images)):
            assert rel_err(a, b) < 1e-12


def test_state_dict_is_timms_and_weights_give_timms_outputs():
    timm = pytest.importorskip("timm")
    for name in ARCHS:
        with torch.device("meta"):  # keys and shapes only: no memory, no initialisation
            ours, theirs = create_encoder(name).state_dict(), timm.create_model(name, pretrained=False).state_dict()
        assert list(ours) == list(theirs), name
        assert all(ours[k].shape == theirs[k].shape for k in ours), name
    theirs = timm.create_model("convnext_tiny", pretrained=False).eval()
    ours = convnext_tiny().eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(ours(x), theirs(x), atol=1e-5)
    for a, b in zip(ours.forward_features(x), theirs.forward_intermediates(x, intermediates_only=True)):
        assert torch.allclose(a, b, atol=1e-5)
    theirs.load_state_dict(convnext_tiny().state_dict(), strict=True)


def _to_official(state: dict) -> dict:
    """timm keys -> the official ConvNeXt layout (SparK's released ``*_official_style.pth``), written
    independently of the loader: stem/downsample -> downsample_layers, blocks -> stages.i.j with
    dwconv/pwconv1/pwconv2, head.norm -> norm, head.fc -> head."""
    out = {}
    for k, v in state.items():
        k = re.sub(r"^stem\.", "downsample_layers.0.", k)
        k = re.sub(r"^stages\.(\d)\.downsample\.", r"downsample_layers.\1.", k)
        k = re.sub(r"^stages\.(\d)\.blocks\.(\d+)\.", r"stages.\1.\2.", k)
        k = k.replace(".conv_dw.", ".dwconv.").replace(".mlp.fc1.", ".pwconv1.").replace(".mlp.fc2.", ".pwconv2.")
        k = re.sub(r"^head\.norm\.", "norm.", k)
        k = re.sub(r"^head\.fc\.", "head.", k)
        out[k] = v
    return out


def test_official_and_spark_layouts_load_back_identical():
    torch.manual_seed(1)
    source = _randomize(_small())
    state = source.state_dict()
    official = _to_official(state)
    assert "downsample_layers.1.1.weight" in official and "stages.2.1.pwconv2.bias" in official
    assert "norm.weight" in official and "head.weight" in official and "stages.0.0.gamma" in official
    assert not set(official) & {k for k in state if k.startswith(("stem.", "head.fc"))}
    for wrapped in (official, {"model": official}, {f"module.{k}": v for k, v in official.items()}):
        target = _small()
        target.load_state_dict(wrapped, strict=True)
        got = target.state_dict()
        assert list(got) == list(state)
        assert all(torch.equal(got[k], state[k]) for k in state)
    # SparK's pre-training model names its classifier `fc`; its released encoder weights may lack it
    spark = {("fc." + k[len("head."):] if k.startswith("head.") else k): v for k, v in official.items()}
    target = _small()
    target.load_state_dict(spark, strict=True)
    assert torch.equal(target.head.fc.weight, source.head.fc.weight)
    no_head = {k: v for k, v in official.items() if not k.startswith(("head.", "norm."))}
    missing = _small().load_state_dict(no_head, strict=False).missing_keys
    assert sorted(missing) == ["head.fc.bias", "head.fc.weight", "head.norm.bias", "head.norm.weight"]


def test_encoders_are_created_by_name_with_their_contract():
    assert set(ARCHS) <= set(encoder_names())
    widths = {"convnext_tiny": 768, "convnext_small": 768, "convnext_base": 1024, "convnext_large": 1536}
    depths = {"convnext_tiny": 18, "convnext_small": 36, "convnext_base": 36, "convnext_large": 36}
    for name in ARCHS:
        with torch.device("meta"):
            enc = create_encoder(name, in_chans=1, drop_path_rate=0.1)
        assert (enc.patch_size, enc.spatial_dims, enc.in_chans, enc.num_features) == (32, 2, 1, widths[name])
        assert enc.feature_channels == tuple(widths[name] // 8 * 2 ** i for i in range(4))
        assert enc.feature_strides == (4, 8, 16, 32) and enc.sparse_ops == CONVNEXT_OPS
        rates = [b.drop_path.p for s in enc.stages for b in s.blocks if hasattr(b.drop_path, "p")]
        assert len(rates) == depths[name] - 1 and abs(rates[-1] - 0.1) < 1e-6 and rates == sorted(rates)
    enc = _small()
    enc.reset_classifier(5)
    assert enc.get_classifier() is enc.head.fc and enc.head.fc.out_features == 5


def test_backends_without_convnext_ops_refuse_at_selection_with_the_reason():
    from ctssl.sparse.backends.cuda import CudaBackend
    from ctssl.sparse.backends.minkowski import MinkowskiBackend
    from ctssl.sparse.backends.spconv import SpconvBackend

    for cls, why in ((SpconvBackend, "spconv has no depthwise convolution"),
                     (MinkowskiBackend, "MinkowskiEngine has no depthwise convolution")):
        with pytest.raises(ValueError, match=f"cannot run ConvNeXt: it has no depthwise_conv, .*{why}"):
            cls().check_ops(CONVNEXT_OPS, "ConvNeXt")
    CudaBackend().check_ops(CONVNEXT_OPS, "ConvNeXt")  # issue 16: the cuda backend runs ConvNeXt
    pytest.importorskip("spconv.pytorch")
    with pytest.raises(ValueError, match="backend 'spconv' cannot run ConvNeXt"):
        _small().forward_masked(torch.randn(1, 3, 32, 32), torch.ones(1, 1, 1, dtype=torch.bool), "spconv")


def test_bad_input_gives_clear_errors():
    model = _small()
    active = torch.ones(2, 2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="multiples of 32"):
        model.forward_masked(torch.randn(2, 3, 60, 64), active)
    with pytest.raises(ValueError, match="channels"):
        model.forward_masked(torch.randn(2, 1, 64, 64), active)
    with pytest.raises(ValueError, match="4 stage depths"):
        ConvNeXt((1, 1, 1), (8, 8, 8))
