"""Pictures of a run: SparK's input / masked input / reconstruction grids, loss and online-evaluation curves."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from ..atomic import replace_atomically
from .logger import EVAL_KIND, read_log


def _to_unit_range(image: torch.Tensor) -> torch.Tensor:
    """Values already in [0, 1] stay; anything else is min-max scaled (per image)."""
    lo, hi = float(image.min()), float(image.max())
    if lo >= 0.0 and hi <= 1.0:
        return image
    return (image - lo) / (hi - lo) if hi > lo else torch.zeros_like(image)


def image_grid(images: torch.Tensor, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """An (H, W, 3) uint8 grid of ``images``.

    Accepts (H, W), (C, H, W), (N, C, H, W) or (rows, cols, C, H, W) with C in {1, 3}; each
    image is scaled to [0, 1] on its own unless it already is.
    """
    x = images.detach().float().cpu()
    if x.dim() == 2:
        x = x[None, None]
    elif x.dim() == 3:
        x = x[None]
    if x.dim() == 5:
        columns = x.shape[1]
        x = x.flatten(0, 1)
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"cannot draw a tensor of shape {tuple(images.shape)} as images")
    n, c, h, w = x.shape
    columns = columns or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / columns)
    grid = torch.ones(3, rows * (h + pad) + pad, columns * (w + pad) + pad)
    for k in range(n):
        r, col = divmod(k, columns)
        tile = _to_unit_range(x[k]).expand(3, h, w)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = tile
    return (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, columns: int | None = None) -> Path:
    """Write ``image_grid(images)`` as a PNG (temp file + rename, so readers never see half a file)."""
    from PIL import Image

    with replace_atomically(path) as tmp:
        Image.fromarray(image_grid(images, columns)).save(tmp, format="PNG")
    return Path(path)


def plot_loss_curve(log_path: str | os.PathLike, png_path: str | os.PathLike,
                    title: str = "pre-training loss") -> Path | None:
    """A PNG of loss (and learning rate) against step from ``log.jsonl``; None when there is nothing to plot."""
    records = [r for r in read_log(log_path) if "step" in r and isinstance(r.get("loss"), (int, float))]
    if not records:
        return None
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    steps = [r["step"] for r in records]
    fig = Figure(figsize=(6, 3.6), dpi=100)
    ax = fig.subplots()
    ax.plot(steps, [r["loss"] for r in records], color="tab:blue", lw=1.2, label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if all("lr" in r for r in records):
        ax2 = ax.twinx()
        ax2.plot(steps, [r["lr"] for r in records], color="tab:orange", lw=0.8, alpha=0.7, label="lr")
        ax2.set_ylabel("learning rate")
    fig.tight_layout()
    with replace_atomically(png_path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(png_path)


def eval_records(log_path: str | os.PathLike) -> list[dict]:
    """The online-evaluation records of a ``log.jsonl``, by step."""
    return sorted((r for r in read_log(log_path) if r.get("kind") == EVAL_KIND and "step" in r),
                  key=lambda r: r["step"])


def plot_eval_curves(curves: dict[str, list[dict]], png_path: str | os.PathLike,
                     title: str = "online evaluation") -> Path | None:
    """A PNG of k-NN (solid) and linear-probe (dashed) accuracy against step, one colour per curve name."""
    curves = {name: [r for r in records if isinstance(r.get("knn_acc"), (int, float))]
              for name, records in curves.items()}
    curves = {name: records for name, records in curves.items() if records}
    if not curves:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.6), dpi=100)
    ax = fig.subplots()
    for i, (name, records) in enumerate(curves.items()):
        color = f"C{i % 10}"
        steps = [r["step"] for r in records]
        label = f"{name} k-NN" if len(curves) > 1 or name else "k-NN"
        ax.plot(steps, [r["knn_acc"] for r in records], color=color, lw=1.2, marker="o", ms=3, label=label)
        probe = [(r["step"], r["probe_acc"]) for r in records if isinstance(r.get("probe_acc"), (int, float))]
        if probe:
            ax.plot(*zip(*probe), color=color, lw=1.0, ls="--", marker="s", ms=3,
                    label=f"{name} linear probe" if name else "linear probe")
    ax.set_xlabel("pre-training step")
    ax.set_ylabel("val accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with replace_atomically(png_path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(png_path)


def plot_eval_curve(log_path: str | os.PathLike, png_path: str | os.PathLike,
                    title: str = "online evaluation") -> Path | None:
    """``plot_eval_curves`` of one run's ``log.jsonl``; None when it holds no evaluation."""
    return plot_eval_curves({"": eval_records(log_path)}, png_path, title)


__all__ = ["image_grid", "save_image_grid", "plot_loss_curve", "plot_eval_curve", "plot_eval_curves", "eval_records"]
