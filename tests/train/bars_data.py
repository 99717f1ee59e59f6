"""A tiny learnable labeled set shared by the fine-tuning and sweep tests."""
import numpy as np


def write_npz(path, n=(48, 16, 16), size=16, seed=0):
    """A MedMNIST-style binary set: a bright bar in the top (class 0) or bottom (class 1) half."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n):
        y = np.arange(count) % 2
        x = (rng.random((count, size, size)) * 60).astype(np.uint8)
        for i, c in enumerate(y):
            top = 2 if c == 0 else size // 2 + 2
            x[i, top:top + 3, 3:size - 3] += 150
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = x, y[:, None]
    np.savez(path, **arrays)
    return str(path)


def write_csv(folder, labels, size=16, seed=0):
    """PNG images of bars and ``labels.csv`` (``path,label``) with the given labels, in ``folder``."""
    from pathlib import Path

    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = ["path,label"]
    for i, label in enumerate(labels):
        x = (rng.random((size, size)) * 60).astype(np.uint8)
        x[2 + (i % 2) * (size // 2): 5 + (i % 2) * (size // 2), 3:size - 3] += 150
        Image.fromarray(x).save(folder / f"img{i:03d}.png")
        lines.append(f"img{i:03d}.png,{label}")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    return str(folder / "labels.csv")
