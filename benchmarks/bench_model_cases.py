"""Model-level workloads: the masked encoder (ResNet or ConvNeXt), a whole SparK step, a contrastive step.

Model weights are drawn from one seed, so every backend times the same network and
``encoder_timing.py`` can compare their losses on the same input as a sanity check.
On a GPU the models run channels-last under bf16 autocast (the profile says).
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from bench_config import NOMASK, Profile, dtype_name
from bench_workload import Workload, random_mask, random_tensor

from ctssl.models import create_encoder
from ctssl.sparse.backends import Backend

FROM_PROFILE = object()
"""Default of ``encoder_workload``'s ``amp_dtype``: take the profile's (None means no autocast)."""


def autocast(profile: Profile, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(profile.device.type, dtype=amp_dtype)


def _place(module: torch.nn.Module, profile: Profile, channels_last: bool, dims: int = 2) -> torch.nn.Module:
    module = module.to(profile.device)
    if not channels_last:
        return module
    return module.to(memory_format=torch.channels_last_3d if dims == 3 else torch.channels_last)


def _images(profile: Profile, batch: int, size: int, seed: int, channels_last: bool, channels: int = 3,
            dims: int = 2) -> torch.Tensor:
    """Images ``(B, C, size, size)`` or cubic volumes ``(B, C, size, size, size)`` (``dims`` 3)."""
    t = random_tensor((batch, channels, *([size] * dims)), torch.float32, profile.device, seed, uniform=True,
                      channels_last=channels_last)
    return t.contiguous(memory_format=torch.channels_last_3d) if channels_last and dims == 3 else t


def _model_info(profile: Profile, case: str, backend_name: str, mask_ratio, batch, size, amp_dtype,
                channels_last, **extra) -> dict[str, Any]:
    return {"suite": "models", "family": "model", "case": case, "mode": "fwdbwd", "backend": backend_name,
            "dtype": f"{dtype_name(amp_dtype)}-autocast" if amp_dtype is not None else "float32",
            "batch": batch, "image_size": size, "mask_ratio": mask_ratio,
            "visible_fraction": 1.0 if mask_ratio is None else None, "channels_last": channels_last, **extra}


def encoder_loss(maps) -> torch.Tensor:
    """A scalar from the four stage maps whose value is the same in every layout (masked
    positions hold zeros, which add nothing), with a non-constant gradient."""
    return sum(m.float().square().sum() for m in maps) * 1e-6


def encoder_workload(profile: Profile, backend: Backend | None, mask_ratio: float | None, *,
                     arch: str | None = None, batch: int | None = None, size: int | None = None,
                     amp_dtype: torch.dtype | None | object = FROM_PROFILE, channels_last: bool | None = None,
                     rotate: int | None = None) -> Workload:
    """Encoder forward + backward: ``forward_masked`` on a backend, or ``forward_features`` on unmasked
    inputs for the no-mask baseline. A new PatchIndex is built every step, as in training. Any registered
    encoder: a 3-D one (``resnet18_3d``) takes cubic volumes of side ``size`` with its own input channels."""
    arch = arch or profile.encoder
    batch = batch or profile.model_batch
    size = size or profile.model_size
    amp_dtype = profile.amp_dtype if amp_dtype is FROM_PROFILE else amp_dtype
    channels_last = profile.channels_last if channels_last is None else channels_last
    rotate = rotate or profile.rotate
    torch.manual_seed(0)
    model = create_encoder(arch)
    dims = model.spatial_dims
    model = _place(model, profile, channels_last, dims).train()
    params = [p for p in model.parameters() if p.requires_grad]
    sets = [(_images(profile, batch, size, 100 + k, channels_last, model.in_chans, dims),
             random_mask(batch, size, 0.5 if mask_ratio is None else mask_ratio, profile.device, 200 + k,
                         dims=dims))
            for k in range(rotate)]

    def step(inp):
        images, active = inp
        for p in params:
            p.grad = None
        with autocast(profile, amp_dtype):
            if backend is None:
                maps = model.forward_features(images)
            else:
                maps = [m.values for m in model.forward_masked(images, active, backend, return_sparse=True,
                                                                check_finite=False)]
            loss = encoder_loss(maps)
        loss.backward()
        return loss.detach()

    name = NOMASK if backend is None else backend.name
    info = _model_info(profile, f"{arch} encoder fwdbwd", name, mask_ratio, batch, size, amp_dtype, channels_last,
                       encoder=arch, spatial_dims=dims)
    if mask_ratio is not None:
        info["visible_fraction"] = float(sets[0][1].float().mean())
    return Workload(step, sets, batch, info, exclude=params + [s[0] for s in sets])


def spark_workload(profile: Profile, backend: Backend, mask_ratio: float, decoder_impl: str = "eager") -> Workload:
    """One SparK training step: masked encoder, densify, light decoder (computed as ``decoder_impl`` says),
    masked-patch loss, backward, optimizer step. AdamW stands in for LAMB (not in torch); its cost is similar."""
    from ctssl.ssl import create_method  # skipped by the caller when ctssl.ssl is missing

    torch.manual_seed(0)
    encoder = create_encoder(profile.encoder)
    method = create_method("spark", encoder, backend.name, mask_ratio=mask_ratio, check_finite=False,
                           decoder_width=profile.decoder_width, input_size=profile.model_size,
                           decoder_impl=decoder_impl)
    method = _place(method, profile, profile.channels_last).train()
    opt = torch.optim.AdamW(method.param_groups(0.04), lr=1e-4, betas=(0.9, 0.95))
    B, S = profile.model_batch, profile.model_size
    sets = [(_images(profile, B, S, 300 + k, profile.channels_last),
             random_mask(B, S, mask_ratio, profile.device, 400 + k))
            for k in range(profile.rotate)]

    def step(inp):
        images, active = inp
        opt.zero_grad(set_to_none=True)
        with autocast(profile, profile.amp_dtype):
            loss = method(images, active)["loss"]
        loss.backward()
        opt.step()
        return loss.detach()

    info = _model_info(profile, f"SparK step ({profile.encoder}, decoder {profile.decoder_width}"
                       + ("" if decoder_impl == "eager" else f", {decoder_impl}") + ")", backend.name,
                       mask_ratio, B, S, profile.amp_dtype, profile.channels_last, encoder=profile.encoder,
                       decoder_width=profile.decoder_width, decoder_impl=decoder_impl,
                       optimizer="AdamW (stand-in for LAMB)")
    info["visible_fraction"] = float(sets[0][1].float().mean())
    params = [p for p in method.parameters()]
    return Workload(step, sets, B, info, exclude=params + [s[0] for s in sets])


def contrastive_workload(profile: Profile, method_name: str = "mocov2") -> Workload:
    """One contrastive training step (two views per image, dense encoder, SGD), for comparison."""
    from ctssl.ssl import create_method

    torch.manual_seed(0)
    encoder = create_encoder(profile.encoder)
    method = create_method(method_name, encoder, "dense", input_size=profile.model_size)
    method = _place(method, profile, profile.channels_last).train()
    opt = torch.optim.SGD(method.param_groups(1e-4), lr=0.03, momentum=0.9)
    B, S = profile.model_batch, profile.model_size
    sets = [[_images(profile, B, S, 500 + 2 * k + v, profile.channels_last) for v in range(2)]
            for k in range(profile.rotate)]

    def step(views):
        opt.zero_grad(set_to_none=True)
        with autocast(profile, profile.amp_dtype):
            loss = method(views)["loss"]
        loss.backward()
        opt.step()
        method.after_step(0, 1)
        return loss.detach()

    info = _model_info(profile, f"{method_name} step ({profile.encoder}, 2 views)", NOMASK, None, B, S,
                       profile.amp_dtype, profile.channels_last, encoder=profile.encoder, optimizer="SGD")
    params = [p for p in method.parameters()] + [b for b in method.buffers()]
    return Workload(step, sets, B, info, exclude=params + [v for s in sets for v in s])
