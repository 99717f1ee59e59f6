"""SparK: masked image modelling for CNNs (Tian et al., ICLR 2023), on ctssl's sparse engine.

One step: mask 60% of the 32x32 patches (exactly ``round(L * 0.4)`` kept per image), run the
encoder (ResNet or ConvNeXt) on the visible patches only (any engine backend with the
encoder's ops), densify the four stage maps (sparse BN for ResNets, sparse LayerNorm for
ConvNeXts, a learned per-stage mask token at masked positions, a projection to the decoder
width), decode densely with the light UNet decoder, and regress the per-patch normalised
pixels of the masked patches.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..data.augment import SparkTransform
from ..models.decoder import LightDecoder
from ..sparse import get_backend, random_patch_mask
from ..sparse.backends import Backend
from ..sparse.modules import BatchNorm2d, LayerNorm2d
from .base import SSLMethod

DENSIFY_NORMS = {"batch_norm": BatchNorm2d, "layer_norm": lambda c: LayerNorm2d(c, eps=1e-6)}
"""SparK's sparse norm before densifying, by the encoder's ``densify_norm`` (BN for ResNets, LN for ConvNeXts)."""


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, L, C*p*p)`` with patches in row-major grid order."""
    B, C, H, W = x.shape
    h, w = H // p, W // p
    return x.reshape(B, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, C * p * p)


def unpatchify(x: torch.Tensor, p: int, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """Inverse of ``patchify`` for an image batch of ``shape``."""
    B, C, H, W = shape
    h, w = H // p, W // p
    return x.reshape(B, h, w, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


def patch_stats(images: torch.Tensor, p: int, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and ``sqrt(var + eps)`` over all channels and pixels of each patch ``(B, L, 1)``.

    The variance is the unbiased one (torch's default), as in SparK.
    """
    patches = patchify(images.float(), p)
    return patches.mean(dim=-1, keepdim=True), (patches.var(dim=-1, keepdim=True) + eps).sqrt()


def masked_patch_loss(reconstruction: torch.Tensor, images: torch.Tensor, active: torch.Tensor,
                      patch_size: int = 32, eps: float = 1e-6) -> torch.Tensor:
    """SparK's loss: MSE to the per-patch normalised image, averaged over masked patches only."""
    if reconstruction.shape != images.shape:
        raise ValueError(f"reconstruction shape {tuple(reconstruction.shape)} != image shape {tuple(images.shape)}")
    mean, std = patch_stats(images, patch_size, eps)
    target = (patchify(images.float(), patch_size) - mean) / std
    per_patch = (patchify(reconstruction.float(), patch_size) - target).pow(2).mean(dim=-1)  # (B, L)
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
    default_hparams = {
        # optimisation (paper-notes: SparK defaults; the seed paper's batch 32 on one GPU)
        "batch_size": 32, "optimizer": "lamb", "base_lr": 2e-4, "lr_batch_ref": 256, "min_lr_ratio": 0.0,
        "weight_decay": 0.04, "weight_decay_end": 0.2, "warmup_epochs": 40, "epochs": 1600,
        "momentum": None, "betas": (0.9, 0.95), "grad_clip": 5.0, "drop_path_rate": 0.05,
        "steps_per_epoch": None,
        # method
        "mask_ratio": 0.6, "decoder_width": 768, "input_size": 224, "check_finite": True, "vis_images": 8,
    }

    def __init__(self, encoder: nn.Module, backend: str | Backend = "auto", **hparams):
        super().__init__(encoder, backend, **hparams)
        if backend != "auto":
            # unknown or unusable names, and backends without the encoder's ops, fail here, before any step
            get_backend(backend, ops=encoder.sparse_ops, model=type(encoder).__name__)
        hp = self.hparams
        if not 0.0 < hp["mask_ratio"] < 1.0:
            raise ValueError(f"spark: mask_ratio must be in (0, 1), got {hp['mask_ratio']}")
        self.patch_size = encoder.patch_size
        width = int(hp["decoder_width"])
        enc_widths = list(reversed(encoder.feature_channels))  # smallest map first
        dec_widths = [width // 2 ** i for i in range(len(enc_widths))]
        if encoder.densify_norm not in DENSIFY_NORMS:
            raise ValueError(f"spark: encoder {type(encoder).__name__} asks for densify norm "
                             f"{encoder.densify_norm!r}; known: {', '.join(DENSIFY_NORMS)}")
        self.densify_norms = nn.ModuleList(DENSIFY_NORMS[encoder.densify_norm](c) for c in enc_widths)
        self.mask_tokens = nn.ParameterList(nn.Parameter(torch.zeros(c)) for c in enc_widths)
        for token in self.mask_tokens:
            nn.init.trunc_normal_(token, std=0.02)
        # SparK's projections: 1x1 at the smallest map (none when the widths already agree), 3x3 elsewhere
        self.densify_projs = nn.ModuleList(
            nn.Identity() if i == 0 and ce == cd else nn.Conv2d(ce, cd, 1 if i == 0 else 3, padding=0 if i == 0 else 1)
            for i, (ce, cd) in enumerate(zip(enc_widths, dec_widths)))
        self.decoder = LightDecoder(width, out_chans=encoder.in_chans, num_blocks=5)

    # --- pieces --------------------------------------------------------------
    def _images(self, batch) -> torch.Tensor:
        if not isinstance(batch, torch.Tensor) or batch.dim() != 4:
            raise TypeError(f"spark: the batch must be an image tensor (B, C, H, W), got "
                            f"{tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__}")
        return batch

    def random_mask(self, images: torch.Tensor) -> torch.Tensor:
        """SparK's mask for ``images``: boolean ``(B, H/32, W/32)``, True = visible."""
        B, _, H, W = images.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"spark: image size {H}x{W} must be a multiple of the patch size {p}")
        return random_patch_mask(B, (H // p, W // p), self.hparams["mask_ratio"], device=images.device)

    def fill_masked(self, stage: int, feature) -> torch.Tensor:
        """Sparse BN (LN for ConvNeXt) of one sparse stage map (``stage`` 0 = smallest), then a dense map
        with the stage's mask token at every masked position."""
        feature = self.densify_norms[stage](feature)
        return feature.backend.densify(feature, self.mask_tokens[stage])

    def densify(self, features) -> list[torch.Tensor]:
        """Sparse stage maps (strides 4..32) -> dense decoder inputs at the decoder widths, smallest first."""
        return [self.densify_projs[i](self.fill_masked(i, f)) for i, f in enumerate(reversed(features))]

    def reconstruct(self, images: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Decoder output ``(B, C, H, W)`` in per-patch normalised units."""
        backend = get_backend(self.backend, images.device, ops=self.backbone.sparse_ops,
                              model=type(self.backbone).__name__)
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
        if size % self.patch_size:
            raise ValueError(f"spark: input size {size} must be a multiple of the patch size {self.patch_size}")
        return SparkTransform(size)

    @torch.no_grad()
    def visualize(self, batch, active: torch.Tensor | None = None) -> torch.Tensor:
        """``(3 * n, C, H, W)`` in [0, 1] for the first ``n = min(B, vis_images)`` images:
        n inputs, then n masked inputs, then n reconstructions (de-normalised per patch with the
        input's statistics, visible patches pasted from the input). ``make_grid(x, nrow=n)``
        lays them out as three rows. Running statistics are left unchanged.
        """
        images = self._images(batch)[: self.hparams["vis_images"]]
        if active is None:
            active = self.random_mask(images)
        active = active[: images.shape[0]]
        with preserved_buffers(self):
            rec = self.reconstruct(images, active)
        p = self.patch_size
        mean, std = patch_stats(images, p)
        rec = unpatchify(patchify(rec.float(), p) * std + mean, p, tuple(images.shape)).to(images.dtype)
        visible = active.repeat_interleave(p, dim=1).repeat_interleave(p, dim=2).unsqueeze(1)
        masked = images * visible
        pasted = torch.where(visible, images, rec)
        return torch.cat([images, masked, pasted]).clamp(0.0, 1.0)
