"""3-D ResNet encoders: torch backend == dense reference in float64 on volumes (maps, volume gradient,
every parameter gradient, BN running statistics), a crop with no visible patch included; dense forward,
key names, the registry contract and clear errors."""
import pytest
import torch

from ctssl.models import RESNETS_3D, create_encoder, encoder_names, resnet18, resnet18_3d, resnet50_3d

from .helpers import assert_runs_match, rel_err, run_model

F64 = torch.float64


def _volumes(batch, shape, seed):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 1, *shape, generator=gen, dtype=F64)
    active = torch.rand(batch, *(s // 32 for s in shape), generator=gen) < 0.5
    return images, active, gen


@pytest.mark.parametrize("make,shape", [(resnet18_3d, (64, 64, 64)), (resnet50_3d, (64, 32, 64))])
def test_torch_backend_equals_dense_float64_training_step(make, shape):
    """One volume shows nothing, the other most of its patches (BN at stride 32 needs a few rows to have
    gradients above rounding noise) and a random rest."""
    torch.manual_seed(0)
    model = make().double().train()
    images, active, _ = _volumes(2, shape, 1)
    active[0] = False
    active[1].view(-1)[:active[1].numel() // 2 + 1] = True
    ref = run_model(model, images, active, "dense")
    out = run_model(model, images, active, "torch", loss_weights=ref[4])
    assert_runs_match(ref, out, 1e-9)
    assert all(torch.isfinite(m).all() for m in out[0])
    assert any(n.endswith("running_mean") for n in ref[3])


def test_torch_backend_equals_dense_float64_eval():
    torch.manual_seed(0)
    model = resnet18_3d().double().eval()
    images, active, _ = _volumes(2, (32, 64, 32), 2)
    ref = run_model(model, images, active, "dense")
    assert_runs_match(ref, run_model(model, images, active, "torch", loss_weights=ref[4]), 1e-9)


def test_masked_maps_have_stage_shapes_and_zeros_where_masked():
    torch.manual_seed(0)
    model = resnet18_3d().eval()
    images, active, _ = _volumes(2, (32, 64, 96), 3)
    with torch.no_grad():
        maps = model.forward_masked(images.float(), active, "torch")
    assert [tuple(m.shape) for m in maps] == [(2, 64, 8, 16, 24), (2, 128, 4, 8, 12), (2, 256, 2, 4, 6),
                                             (2, 512, 1, 2, 3)]
    for m, s in zip(maps, (4, 8, 16, 32)):
        up = active
        for axis in (1, 2, 3):
            up = up.repeat_interleave(32 // s, axis)
        assert (m * ~up.unsqueeze(1)).abs().max() == 0


def test_all_visible_mask_equals_dense_forward_in_eval():
    torch.manual_seed(0)
    model = resnet18_3d().double().eval()
    images, _, _ = _volumes(1, (32, 32, 64), 4)
    active = torch.ones(1, 1, 1, 2, dtype=torch.bool)
    dense = model.forward_features(images)
    for a, b in zip(model.forward_masked(images, active, "torch"), dense):
        assert rel_err(a, b) < 1e-12
    assert model(images).shape == (1, 1000)


def test_torchvision_key_names_with_3d_shapes():
    tv = pytest.importorskip("torchvision.models")
    for name, make in RESNETS_3D.items():
        ours, theirs = make().state_dict(), getattr(tv, name[:-3])().state_dict()
        assert list(ours) == list(theirs), name
        for key, v in ours.items():
            t = theirs[key]
            if t.dim() == 4:  # a conv kernel gains a depth axis; the stem takes 1 channel, not 3
                cin = 1 if key == "conv1.weight" else t.shape[1]
                assert v.shape == (t.shape[0], cin, t.shape[2], *t.shape[2:]), key
            else:
                assert v.shape == t.shape, key
    model = resnet18_3d()
    assert model.conv1.weight.shape == (64, 1, 7, 7, 7) and model.conv1.stride == (2, 2, 2)
    assert model.conv1.padding == (3, 3, 3)
    assert (model.maxpool.kernel_size, model.maxpool.stride, model.maxpool.padding) == (3, 2, 1)
    assert [layer[0].conv1.stride for layer in (model.layer1, model.layer2, model.layer3, model.layer4)] == \
        [(1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2)]
    assert model.layer2[0].downsample[0].weight.shape == (128, 64, 1, 1, 1)


def test_registry_contract():
    assert {"resnet18_3d", "resnet34_3d", "resnet50_3d"} <= set(encoder_names())
    enc = create_encoder("resnet50_3d")
    assert (enc.patch_size, enc.spatial_dims, enc.in_chans, enc.norm) == (32, 3, 1, "batch")
    assert enc.feature_channels == (256, 512, 1024, 2048) and enc.feature_strides == (4, 8, 16, 32)
    assert create_encoder("resnet18_3d", in_chans=2).conv1.in_channels == 2
    assert resnet18().spatial_dims == 2


def test_bad_input_and_options_give_clear_errors():
    model = resnet18_3d()
    volumes = torch.randn(1, 1, 32, 32, 32)
    with pytest.raises(ValueError, match=r"this 3-D encoder takes volumes \(B, C, D, H, W\), got shape "
                                         r"\(1, 1, 32, 32\)"):
        model.forward_masked(torch.randn(1, 1, 32, 32), torch.ones(1, 1, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"this 2-D encoder takes images \(B, C, H, W\)"):
        resnet18().forward_masked(torch.randn(1, 3, 32, 32, 32), torch.ones(1, 1, 1, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"active must have shape \(B, D/32, H/32, W/32\)"):
        model.forward_masked(volumes, torch.ones(1, 1, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="channels"):
        model.forward_masked(torch.randn(1, 3, 32, 32, 32), torch.ones(1, 1, 1, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="norm must be one of batch, instance, got 'group'"):
        resnet18_3d(norm="group")
    with pytest.raises(ValueError, match="norm='instance' is for the 3-D ResNets"):
        resnet18(norm="instance")


def test_instance_norm_encoder_torch_equals_dense_float64():
    """nnU-Net's norm: per-sample statistics over each volume's visible voxels, learned scale and shift."""
    from ctssl.sparse.modules import InstanceNorm3d

    torch.manual_seed(0)
    model = resnet18_3d(norm="instance").double().train()
    assert isinstance(model.bn1, InstanceNorm3d) and isinstance(model.layer2[0].downsample[1], InstanceNorm3d)
    keys = set(model.state_dict())
    assert not any("running" in k or "num_batches" in k for k in keys)
    assert keys == {k for k in resnet18_3d().state_dict() if k.endswith(("weight", "bias"))}
    images, active, _ = _volumes(2, (64, 32, 32), 6)
    active[0] = False
    active[1].view(-1)[:3] = True
    ref = run_model(model, images, active, "dense")
    assert_runs_match(ref, run_model(model, images, active, "torch", loss_weights=ref[4]), 1e-9)
    dense = model.eval().forward_features(images)  # dense volumes: torch's InstanceNorm3d
    assert [tuple(m.shape) for m in dense] == [(2, 64, 16, 8, 8), (2, 128, 8, 4, 4), (2, 256, 4, 2, 2),
                                              (2, 512, 2, 1, 1)]
