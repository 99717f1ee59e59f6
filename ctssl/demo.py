"""ctssl-demo: a SparK-masked ResNet forward+backward on every usable backend, checked against dense.

The smallest end-to-end use of the engine: it needs no data and no GPU, and shows
what each backend computes and how far it is from the reference.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

from .models import create_encoder
from .sparse import backend_status, random_patch_mask


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="ctssl-demo", description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--mask-ratio", type=float, default=0.6)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.image_size % 32:
        print(f"ctssl-demo: --image-size must be a multiple of 32, got {args.image_size}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = create_encoder(args.arch).to(device).train()
    grid = (args.image_size // 32, args.image_size // 32)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    active = random_patch_mask(args.batch_size, grid, args.mask_ratio,
                               generator=torch.Generator().manual_seed(args.seed), device=device)
    print(f"{args.arch}, batch {args.batch_size}, {args.image_size}px, mask ratio {args.mask_ratio}: "
          f"{int(active.sum())} of {active.numel()} patches visible, on {device}")
    reference = None
    for name, reason in backend_status().items():
        if reason is not None:
            print(f"  {name:10s} skipped: {reason}")
            continue
        m = copy.deepcopy(model)
        x = images.clone().requires_grad_(True)
        try:
            start = time.perf_counter()
            maps = m.forward_masked(x, active, name)
            sum(mp.square().mean() for mp in maps).backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
        except (ValueError, NotImplementedError, RuntimeError) as exc:
            print(f"  {name:10s} failed here: {exc}")
            continue
        result = torch.cat([mp.detach().flatten() for mp in maps] + [x.grad.flatten()])
        if reference is None:
            reference = result
        err = float((result - reference).norm() / reference.norm())
        print(f"  {name:10s} fwd+bwd {elapsed * 1e3:8.1f} ms (one cold run)  rel. diff vs dense {err:.1e}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
