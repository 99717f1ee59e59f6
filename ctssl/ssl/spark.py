"""SparK: masked image modelling for CNNs (Tian et al., ICLR 2023), on ctssl's sparse engine.

One step: mask 60% of the 32x32 patches (exactly ``round(L * 0.4)`` kept per image), run the
encoder (ResNet or ConvNeXt) on the visible patches only (any engine backend with the
encoder's ops), densify the four stage maps (sparse BN for ResNets, sparse LayerNorm for
ConvNeXts, a learned per-stage mask token at masked positions, a projection to the decoder
width), decode densely with the light UNet decoder, and regress the per-patch normalised
pixels of the masked patches.

Volumes (a 3-D encoder, e.g. ``resnet18_3d``) take the same path: patches are cubes of the
encoder's patch size (32x32x32), the masks, patchify, loss, densify and decoder are the n-d
forms of the same code, and ``visualize`` shows the middle slice of each volume.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from ..data.augment import SparkTransform, SparkTransform3d
from ..models.decoder import LightDecoder
from ..sparse import get_backend, random_patch_mask
from ..sparse.backends import Backend
from ..sparse.modules import BatchNorm2d, BatchNorm3d, LayerNorm2d
from .base import SSLMethod, spatial_dims_of

DENSIFY_NORMS = {
    ("batch_norm", 2): BatchNorm2d,
    ("batch_norm", 3): BatchNorm3d,
    ("layer_norm", 2): lambda c: LayerNorm2d(c, eps=1e-6),
}
"""SparK's sparse norm before densifying, by the encoder's ``(densify_norm, spatial_dims)`` (BN for ResNets, LN for
ConvNeXts)."""
_CONVS = {2: nn.Conv2d, 3: nn.Conv3d}


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """``(B, C, *sizes)`` -> ``(B, L, C * p**n)``: images (n = 2) or volumes (n = 3) cut into ``p``-sided
    patches, in row-major grid order (the order of ``active.flatten(1)``)."""
    B, C, *sizes = x.shape
    n = len(sizes)
    grid = [s // p for s in sizes]
    x = x.reshape(B, C, *[v for g in grid for v in (g, p)])  # (B, C, g0, p, g1, p, ...)
    order = [0, *(2 + 2 * i for i in range(n)), 1, *(3 + 2 * i for i in range(n))]
    return x.permute(order).reshape(B, math.prod(grid), C * p ** n)


def unpatchify(x: torch.Tensor, p: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of ``patchify`` for an image or volume batch of ``shape``."""
    B, C, *sizes = shape
    n = len(sizes)
    grid = [s // p for s in sizes]
    x = x.reshape(B, *grid, C, *[p] * n)  # (B, g0, g1, ..., C, p, p, ...)
    order = [0, n + 1, *(v for i in range(n) for v in (1 + i, n + 2 + i))]
    return x.permute(order).reshape(shape)


def upsample_mask(active: torch.Tensor, p: int) -> torch.Tensor:
    """Patch mask ``(B, *grid)`` -> pixel (voxel) mask ``(B, 1, *grid * p)``."""
    for dim in range(1, active.dim()):
        active = active.repeat_interleave(p, dim=dim)
    return active.unsqueeze(1)


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """float32 for low-precision inputs (bf16 autocast), float64 stays float64 (equivalence tests)."""
    return x if x.dtype == torch.float64 else x.float()


def patch_stats(images: torch.Tensor, p: int, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and ``sqrt(var + eps)`` over all channels and pixels of each patch ``(B, L, 1)``.

    The variance is the unbiased one (torch's default), as in SparK.
    """
    patches = patchify(_at_least_float32(images), p)
    return patches.mean(dim=-1, keepdim=True), (patches.var(dim=-1, keepdim=True) + eps).sqrt()


def masked_patch_loss(reconstruction: torch.Tensor, images: torch.Tensor, active: torch.Tensor,
                      patch_size: int = 32, eps: float = 1e-6) -> torch.Tensor:
    """SparK's loss: MSE to the per-patch normalised image, averaged over masked patches only."""
    if reconstruction.shape != images.shape:
        raise ValueError(f"reconstruction shape {tuple(reconstruction.shape)} != image shape {tuple(images.shape)}")
    mean, std = patch_stats(images, patch_size, eps)
    target = (patchify(_at_least_float32(images), patch_size) - mean) / std
    per_patch = (patchify(_at_least_float32(reconstruction), patch_size) - target).pow(2).mean(dim=-1)  # (B, L)
    masked = (~active).reshape(per_patch.shape).to(per_patch.dtype)
    return (per_patch * masked).sum() / masked.sum().clamp_min(1.0)


@contextlib.contextmanager
def preserved_buffers(module: nn.Module):
    """Restore every buffer (BN running statistics) on exit: for side-effect-free visualisation."""
    saved = {name: b.detach().clone() for name, b in module.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, b in module.named_buffers():
                b.copy_(saved[name])


class SparK(SSLMethod):
    """SparK with a ctssl encoder (ResNet, ConvNeXt); ``backend`` picks the sparse engine (dense, torch, triton...)."""

    name = "spark"
    spatial_dims = (2, 3)
    default_hparams = {
        # optimisation (paper-notes: SparK defaults; the seed paper's batch 32 on one GPU)
        "batch_size": 32, "optimizer": "lamb", "base_lr": 2e-4, "lr_batch_ref": 256, "min_lr_ratio": 0.0,
        "weight_decay": 0.04, "weight_decay_end": 0.2, "warmup_epochs": 40, "epochs": 1600,
        "momentum": None, "betas": (0.9, 0.95), "grad_clip": 5.0, "drop_path_rate": 0.05,
        "steps_per_epoch": None,
        # method
        "mask_ratio": 0.6, "decoder_width": 768, "input_size": 224, "check_finite": True, "vis_images": 8,
        # how the dense decoder computes (``ctssl.models.decoder.DECODER_IMPLS``): exact alternatives, same weights
        "decoder_impl": "eager",
    }

    def __init__(self, encoder: nn.Module, backend: str | Backend = "auto", **hparams):
        super().__init__(encoder, backend, **hparams)
        if backend != "auto":
            # unknown or unusable names, backends without the encoder's ops or its grids (cuda, minkowski: 2-D only)
            # fail here, before any step
            get_backend(backend, ops=encoder.sparse_ops, model=type(encoder).__name__).check_spatial_dims(
                spatial_dims_of(encoder))
        hp = self.hparams
        if not 0.0 < hp["mask_ratio"] < 1.0:
            raise ValueError(f"spark: mask_ratio must be in (0, 1), got {hp['mask_ratio']}")
        self.patch_size = encoder.patch_size
        self.input_dims = dims = spatial_dims_of(encoder)
        width = int(hp["decoder_width"])
        enc_widths = list(reversed(encoder.feature_channels))  # smallest map first
        dec_widths = [width // 2 ** i for i in range(len(enc_widths))]
        norm = DENSIFY_NORMS.get((encoder.densify_norm, dims))
        if norm is None:
            known = ", ".join(f"{n} ({d}-D)" for n, d in DENSIFY_NORMS)
            raise ValueError(f"spark: encoder {type(encoder).__name__} asks for densify norm "
                             f"{encoder.densify_norm!r} in {dims}-D; known: {known}")
        self.densify_norms = nn.ModuleList(norm(c) for c in enc_widths)
        self.mask_tokens = nn.ParameterList(nn.Parameter(torch.zeros(c)) for c in enc_widths)
        for token in self.mask_tokens:
            nn.init.trunc_normal_(token, std=0.02)
        # SparK's projections: 1x1 at the smallest map (none when the widths already agree), 3x3 elsewhere
        conv = _CONVS[dims]
        self.densify_projs = nn.ModuleList(
            nn.Identity() if i == 0 and ce == cd else conv(ce, cd, 1 if i == 0 else 3, padding=0 if i == 0 else 1)
            for i, (ce, cd) in enumerate(zip(enc_widths, dec_widths)))
        self.decoder = LightDecoder(width, out_chans=encoder.in_chans, num_blocks=5, spatial_dims=dims,
                                    impl=hp["decoder_impl"])

    # --- pieces --------------------------------------------------------------
    def _images(self, batch) -> torch.Tensor:
        if not isinstance(batch, torch.Tensor) or batch.dim() != self.input_dims + 2:
            want = "an image tensor (B, C, H, W)" if self.input_dims == 2 else "a volume tensor (B, C, D, H, W)"
            raise TypeError(f"spark: the batch of this {self.input_dims}-D encoder must be {want}, got "
                            f"{tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__}")
        return batch

    def random_mask(self, images: torch.Tensor) -> torch.Tensor:
        """SparK's mask for ``images``: boolean ``(B, H/32, W/32)`` (``(B, D/32, H/32, W/32)`` for volumes),
        True = visible."""
        sizes = tuple(images.shape[2:])
        p = self.patch_size
        if any(s % p for s in sizes):
            raise ValueError(f"spark: input size {'x'.join(map(str, sizes))} must be a multiple of the patch size {p}")
        grid = tuple(s // p for s in sizes)
        return random_patch_mask(images.shape[0], grid, self.hparams["mask_ratio"], device=images.device)

    def fill_masked(self, stage: int, feature) -> torch.Tensor:
        """Sparse BN (LN for ConvNeXt) of one sparse stage map (``stage`` 0 = smallest), then a dense map
        with the stage's mask token at every masked position."""
        feature = self.densify_norms[stage](feature)
        return feature.backend.densify(feature, self.mask_tokens[stage])

    def densify(self, features) -> list[torch.Tensor]:
        """Sparse stage maps (strides 4..32) -> dense decoder inputs at the decoder widths, smallest first
        (images or volumes)."""
        return [self.densify_projs[i](self.fill_masked(i, f)) for i, f in enumerate(reversed(features))]

    def engine(self, device: torch.device) -> Backend:
        """The backend of this method on ``device``. ``auto`` on volumes never picks a 2-D-only backend: when its
        pick cannot take the encoder's grids (the cuda backend is 2-D only) the torch backend runs instead."""
        ops, model = self.backbone.sparse_ops, type(self.backbone).__name__
        backend = get_backend(self.backend, device, ops=ops, model=model)
        if isinstance(self.backend, str) and self.backend == "auto" and self.input_dims not in backend.spatial_dims:
            backend = get_backend("torch", device, ops=ops, model=model)
        return backend

    def reconstruct(self, images: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Decoder output ``(B, C, H, W)`` (``(B, C, D, H, W)`` for volumes) in per-patch normalised units."""
        backend = self.engine(images.device)
        features = self.backbone.forward_masked(images, active, backend, return_sparse=True,
                                                check_finite=self.hparams["check_finite"])
        return self.decoder(self.densify(features))

    # --- interface -----------------------------------------------------------
    def forward(self, batch, active: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``active`` (optional) fixes the mask; by default a fresh random one is drawn."""
        images = self._images(batch)
        if active is None:
            active = self.random_mask(images)
        reconstruction = self.reconstruct(images, active)
        return {"loss": masked_patch_loss(reconstruction, images, active, self.patch_size)}

    def train_transform(self, size: int):
        """SparK's crop + flip of one image, or of one volume crop (``SparkTransform3d``) for a 3-D encoder."""
        if size % self.patch_size:
            raise ValueError(f"spark: input size {size} must be a multiple of the patch size {self.patch_size}")
        return SparkTransform3d(size) if self.input_dims == 3 else SparkTransform(size)

    @torch.no_grad()
    def visualize(self, batch, active: torch.Tensor | None = None) -> torch.Tensor:
        """``(3 * n, C, H, W)`` in [0, 1] for the first ``n = min(B, vis_images)`` images:
        n inputs, then n masked inputs, then n reconstructions (de-normalised per patch with the
        input's statistics, visible patches pasted from the input). ``make_grid(x, nrow=n)``
        lays them out as three rows. Running statistics are left unchanged. For volumes the step runs
        on the whole volumes and the picture shows the middle slice (along depth) of each.
        """
        images = self._images(batch)[: self.hparams["vis_images"]]
        if active is None:
            active = self.random_mask(images)
        active = active[: images.shape[0]]
        with preserved_buffers(self):
            rec = self.reconstruct(images, active)
        p = self.patch_size
        mean, std = patch_stats(images, p)
        rec = unpatchify(patchify(_at_least_float32(rec), p) * std + mean, p, tuple(images.shape)).to(images.dtype)
        visible = upsample_mask(active, p)
        masked = images * visible
        pasted = torch.where(visible, images, rec)
        picture = torch.cat([images, masked, pasted]).clamp(0.0, 1.0)
        return picture[:, :, picture.shape[2] // 2] if picture.dim() == 5 else picture
