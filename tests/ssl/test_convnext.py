"""Every method with a ConvNeXt backbone: SparK's densify (sparse LayerNorm, widths from the encoder),
torch == dense through the whole SparK loss, the contrastive methods' steps, and refusal of backends
without ConvNeXt's ops before anything runs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ctssl.models import ConvNeXt, create_encoder
from ctssl.sparse import get_backend
from ctssl.sparse.backends.cuda import CudaBackend
from ctssl.sparse.backends.minkowski import MinkowskiBackend
from ctssl.sparse.modules import LayerNorm2d
from ctssl.ssl import METHODS, create_method

from .helpers import TINY_HPARAMS, images, make_batch
from .test_spark import _loss_and_grads

ACTIVE = torch.tensor([[[True, False], [True, False]], [[False, False], [False, True]]])  # 2 and 1 visible


def small_convnext(in_chans: int = 1) -> ConvNeXt:
    torch.manual_seed(0)
    return ConvNeXt((1, 1, 2, 1), (16, 24, 32, 40), in_chans=in_chans)


def test_spark_densifies_convnext_features_with_sparse_layer_norm_and_sparks_widths():
    with torch.device("meta"):  # the real ConvNeXt-S: shapes only
        m = create_method("spark", create_encoder("convnext_small", in_chans=1), backend="dense")
    assert all(isinstance(n, LayerNorm2d) for n in m.densify_norms)
    assert [n.normalized_shape[0] for n in m.densify_norms] == [768, 384, 192, 96]
    assert [t.numel() for t in m.mask_tokens] == [768, 384, 192, 96]
    # SparK: no projection where the smallest map already has the decoder's width (768), 3x3 elsewhere
    assert isinstance(m.densify_projs[0], nn.Identity)
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in m.densify_projs[1:]] == [
        (384, 384, (3, 3)), (192, 192, (3, 3)), (96, 96, (3, 3))]
    assert m.decoder.widths == [768, 384, 192, 96, 48, 24] and m.decoder.proj.out_channels == 1
    assert not m.backbone.get_classifier().weight.requires_grad


def test_spark_with_convnext_torch_gives_the_dense_loss_and_gradients():
    m = create_method("spark", small_convnext(), backend="dense", decoder_width=64).double()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("gamma"):
                p.fill_(0.5)
    x = images(2, seed=3).double()
    ref_loss, ref_grads = _loss_and_grads(m, x, ACTIVE)
    m.backend = get_backend("torch")
    loss, grads = _loss_and_grads(m, x, ACTIVE)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-12)
    assert grads.keys() == ref_grads.keys()
    assert "backbone.stages.2.blocks.1.conv_dw.weight" in grads and "densify_norms.0.weight" in grads
    for name in grads:
        err = float((grads[name] - ref_grads[name]).norm() / ref_grads[name].norm().clamp_min(1e-300))
        assert err <= 1e-9, name


@pytest.mark.parametrize("name", [n for n in METHODS if n != "spark"])
def test_contrastive_methods_train_a_convnext(name):
    torch.manual_seed(0)
    m = create_method(name, small_convnext(), backend="dense", **TINY_HPARAMS[name])
    assert m.backbone.num_features == 40
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.01)
    before = m.backbone.stem[0].weight.detach().clone()
    loss = m(make_batch(m, images(4)))["loss"]
    loss.backward()
    opt.step()
    m.after_step(0, 10)
    assert torch.isfinite(loss)
    assert not torch.equal(m.backbone.stem[0].weight, before)
    assert m.backbone.get_classifier().weight.grad is None  # the classifier is not pre-trained


def test_backends_without_convnext_ops_are_refused_when_the_method_is_built():
    with pytest.raises(ValueError, match="backend 'minkowski' cannot run ConvNeXt: it has no depthwise_conv, "
                                         ".*MinkowskiEngine has no depthwise convolution"):
        create_method("spark", small_convnext(), backend=MinkowskiBackend(), decoder_width=64)
    create_method("spark", small_convnext(), backend=CudaBackend(), decoder_width=64)  # issue 16: cuda runs it
    pytest.importorskip("spconv.pytorch")
    with pytest.raises(ValueError, match="backend 'spconv' cannot run ConvNeXt: .*no depthwise convolution"):
        create_method("spark", small_convnext(), backend="spconv", decoder_width=64)
    create_method("spark", create_encoder("resnet18"), backend="spconv", decoder_width=64)  # ResNets still run there


def test_encoder_without_the_contract_is_refused():
    with pytest.raises(TypeError, match="must be a ctssl.models encoder .*got Linear without forward_features"):
        create_method("simclr", nn.Linear(2, 2))
