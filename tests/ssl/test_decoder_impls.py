"""SparK's decoder alternatives (sub-pixel transposed convs, channels-last, torch.compile) equal the eager decoder in
float64, forward and backward, and share its weights: the GPU run picks the fastest by measurement alone."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ctssl.models.decoder import (
    DECODER_IMPLS,
    LightDecoder,
    SubPixelConvTranspose2d,
    SubPixelConvTranspose3d,
    parse_decoder_impl,
)

from .helpers import images, tiny_method

F64 = torch.float64


def _grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in module.named_parameters()}


def _features(width: int, blocks: int, dims: int, seed: int = 0) -> list[torch.Tensor]:
    """Decoder inputs, smallest first: width / 2**i channels at 2 * 2**i per side (odd-free, batch 2)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, width // 2 ** i, *[2 * 2 ** i] * dims, generator=g, dtype=F64).requires_grad_()
            for i in range(blocks)]


@pytest.mark.parametrize("dims, sizes", [(2, (3, 5)), (3, (2, 3, 4))])
def test_subpixel_transposed_conv_is_the_transposed_conv(dims, sizes):
    """Every output phase, the borders (odd, unequal sizes), the bias and all three gradients."""
    torch.manual_seed(0)
    reference = (nn.ConvTranspose2d, nn.ConvTranspose3d)[dims - 2](5, 7, 4, stride=2, padding=1).to(F64)
    subpixel = (SubPixelConvTranspose2d, SubPixelConvTranspose3d)[dims - 2](5, 7, 4, stride=2, padding=1).to(F64)
    subpixel.load_state_dict(reference.state_dict())
    x = torch.randn(2, 5, *sizes, dtype=F64, requires_grad=True)
    weights = torch.randn(2, 7, *(2 * s for s in sizes), dtype=F64)
    outs, grads = [], []
    for layer in (reference, subpixel):
        x.grad = None
        out = layer(x)
        (out * weights).sum().backward()
        outs.append(out.detach())
        grads.append([x.grad.clone(), *(p.grad for p in layer.parameters())])
    assert outs[1].shape == outs[0].shape == (2, 7, *(2 * s for s in sizes))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-12, atol=1e-12)
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_subpixel_refuses_other_transposed_convs():
    with pytest.raises(ValueError, match="kernel 4, stride 2, padding 1"):
        SubPixelConvTranspose2d(4, 4, 3, stride=2, padding=1)
    with pytest.raises(ValueError, match="output_size is not supported"):
        SubPixelConvTranspose2d(4, 4, 4, stride=2, padding=1)(torch.randn(1, 4, 2, 2), output_size=(4, 4))


def _assert_decoder_matches_eager(impl: str, dims: int, width: int = 32, blocks: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    eager = LightDecoder(width, out_chans=2, num_blocks=blocks, spatial_dims=dims).to(F64)
    other = LightDecoder(width, out_chans=2, num_blocks=blocks, spatial_dims=dims, impl=impl).to(F64)
    assert list(other.state_dict()) == list(eager.state_dict())  # checkpoints move between implementations
    other.load_state_dict(eager.state_dict())
    results = []
    for decoder in (eager, other):
        feats = _features(width, blocks, dims, seed)
        out = decoder(feats)
        g = torch.Generator().manual_seed(seed + 1)
        (out * torch.randn(out.shape, generator=g, dtype=F64)).sum().backward()
        results.append((out.detach(), [f.grad for f in feats], _grads(decoder),
                        {n: b.clone() for n, b in decoder.named_buffers()}))
    (out0, fgrads0, grads0, bufs0), (out1, fgrads1, grads1, bufs1) = results
    torch.testing.assert_close(out1, out0, rtol=1e-10, atol=1e-12)
    for a, b in zip(fgrads1, fgrads0):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-10, atol=1e-12, msg=name)
    for name in bufs0:  # BN running statistics
        torch.testing.assert_close(bufs1[name], bufs0[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("impl", ["subpixel", "channels-last", "channels-last+subpixel"])
@pytest.mark.parametrize("dims", [2, 3])
def test_eager_alternatives_equal_the_eager_decoder(impl, dims):
    _assert_decoder_matches_eager(impl, dims)


def test_compiled_decoder_equals_the_eager_decoder():
    """torch.compile (inductor: BN + ReLU6 fused) of the decoder with every option, forward, backward, BN buffers.
    One compile of a two-block decoder: about 20-40 s on the 2-core CPU."""
    _assert_decoder_matches_eager("compiled+subpixel+channels-last", dims=2)
    decoder = LightDecoder(32, out_chans=1, num_blocks=2, impl="compiled")
    assert decoder._compiled_call_impl is not None
    assert copy.deepcopy(decoder)._compiled_call_impl is not None  # a copy stays compiled
    assert LightDecoder(32, out_chans=1, num_blocks=2)._compiled_call_impl is None


def test_channels_last_decoder_enters_in_the_autocast_dtype():
    decoder = LightDecoder(32, out_chans=1, num_blocks=2, impl="channels-last")
    assert decoder.blocks[0][1].weight.is_contiguous(memory_format=torch.channels_last)
    seen = []
    decoder.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        decoder([torch.randn(2, 32, 2, 2), torch.randn(2, 16, 4, 4)])
    assert seen[0].dtype == torch.bfloat16 and seen[0].is_contiguous(memory_format=torch.channels_last)
    eager_seen = []
    eager = LightDecoder(32, out_chans=1, num_blocks=2)
    eager.blocks[0].register_forward_pre_hook(lambda m, args: eager_seen.append(args[0]))
    eager([torch.randn(2, 32, 2, 2), torch.randn(2, 16, 4, 4)])
    assert eager_seen[0].dtype == torch.float32 and eager_seen[0].is_contiguous()


def test_impl_names_are_checked():
    assert parse_decoder_impl("eager") == frozenset()
    assert parse_decoder_impl(" compiled + subpixel ") == {"compiled", "subpixel"}
    assert set(DECODER_IMPLS) == {"eager", "channels-last", "subpixel", "compiled"}
    for bad in ("fast", "", "eager+compiled", "subpixel+fast"):
        with pytest.raises(ValueError, match="decoder_impl"):
            parse_decoder_impl(bad)
    with pytest.raises(ValueError, match="decoder_impl 'fast'"):
        tiny_method("spark", decoder_impl="fast")


def test_spark_with_subpixel_decoder_has_the_eager_loss_and_gradients():
    """The whole SparK step (torch backend, float64) with the sub-pixel decoder: same loss, same gradients."""
    eager = tiny_method("spark").double()
    subpixel = tiny_method("spark", decoder_impl="subpixel").double()
    subpixel.load_state_dict(eager.state_dict())  # strict: same names, same shapes
    x = images(2, seed=3).double()
    active = torch.tensor([[[True, False], [True, False]], [[False, False], [False, True]]])
    results = []
    for method in (eager, subpixel):
        m = copy.deepcopy(method)
        loss = m(x, active=active)["loss"]
        loss.backward()
        results.append((loss.detach(), _grads(m)))
    assert float(results[1][0]) == pytest.approx(float(results[0][0]), rel=1e-12)
    for name, grad in results[0][1].items():
        if grad is not None:
            torch.testing.assert_close(results[1][1][name], grad, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["channels-last", "subpixel", "compiled+subpixel+channels-last"])
def test_alternatives_on_the_gpu_in_bf16_match_eager(impl):
    """The GPU recipe (bf16 autocast, channels-last model): each alternative against the eager decoder on the same
    card, at the paper's width; bf16 bounds the agreement (about 1e-2 relative), a wrong phase would be O(1).
    One compile only (every option at once; compiling costs seconds of the GPU check's budget); the spark stage
    of gpu_check.sh also checks each variant's loss against the emulation's."""
    torch.manual_seed(0)
    eager = LightDecoder(768, out_chans=3).cuda().to(memory_format=torch.channels_last)
    other = LightDecoder(768, out_chans=3, impl=impl).cuda().to(memory_format=torch.channels_last)
    other.load_state_dict(eager.state_dict())
    g = torch.Generator(device="cuda").manual_seed(1)
    feats = [torch.randn(4, 768 // 2 ** i, 7 * 2 ** i, 7 * 2 ** i, device="cuda", generator=g) for i in range(4)]
    outs = []
    for decoder in (eager, other):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = decoder([f.clone() for f in feats])
        out.float().square().mean().backward()
        outs.append((out.float(), decoder.blocks[0][0].weight.grad.float()))
    for got, want in zip(outs[1], outs[0]):
        assert float((got - want).norm() / want.norm()) < 3e-2
