"""Online evaluation while pre-training: k-NN (and optionally a linear probe) on a labeled set.

A pre-training loss says little about how useful the features are; the k-NN accuracy of the
frozen backbone's features on a labeled set (InstDisc / DINO's monitor) does, at a small cost.
``OnlineEvaluator`` loads the labeled set once through ``finetune_data.load_splits`` (whatever
``ctssl-finetune`` reads: CSV, class folders, MedMNIST ``.npz``), keeps at most ``max_images`` of
its train and val splits decoded in memory at the encoder's input size (grey, float16: 1000 + 1000
images at 224 px hold 200 MB), and then
``evaluate(encoder)``:

- features: the last stage's output pooled over ALL its spatial dims (2-D or 3-D encoders), in
  eval mode (BatchNorm running statistics, no drop-path), under ``no_grad`` and the run's autocast;
  the encoder's train/eval mode and every RNG are restored afterwards, so training is unchanged;
- k-NN: cosine similarity of L2-normalised features; each val image takes its ``k`` (20) most
  similar train images, whose votes are weighted by ``exp(similarity / 0.07)`` (the temperature-
  weighted vote of Wu et al. 2018); the predicted class is the one with the largest summed weight;
- linear probe (``probe=True``): multinomial logistic regression on the standardised cached
  features, full batch, zero-initialised, ``probe_steps`` Adam steps: deterministic, bounded time.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .config import ConfigError, FinetuneConfig, FinetuneError

KNN_K = 20
KNN_TEMPERATURE = 0.07
PROBE_STEPS = 300
PROBE_LR = 0.1
PROBE_WEIGHT_DECAY = 1e-4
_SUBSET_SEED = 0xE7A1


@dataclass
class _Split:
    images: torch.Tensor  # (N, 1, H, W) float16 grey in [0, 1], on the CPU (copied to C channels per batch)
    labels: torch.Tensor  # (N,) int64


def _capped(labels: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """At most ``cap`` indices, drawn without replacement with a fixed seed (all of them when fewer)."""
    n = len(labels)
    if n <= cap:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=cap, replace=False))


def _decode(dataset, indices: np.ndarray, what: str) -> _Split:
    images, labels = [], []
    for i in indices:
        try:
            x, y = dataset[int(i)]
        except Exception as exc:  # a damaged file: name it instead of a decoder traceback
            samples = getattr(dataset, "samples", None)
            name = samples[int(i)] if isinstance(samples, list) else f"image {int(i)}"
            raise ConfigError(f"{what}: cannot read {name} ({type(exc).__name__}: {exc})") from None
        images.append(x[:1].to(torch.float16))
        labels.append(int(y))
    return _Split(torch.stack(images).contiguous(), torch.tensor(labels, dtype=torch.int64))


def _input_dtype(encoder: torch.nn.Module) -> torch.dtype:
    """The dtype of the encoder's weights (float32 unless a test runs it in float64); autocast does the rest."""
    param = next(encoder.parameters(), None)
    return param.dtype if param is not None and param.is_floating_point() else torch.float32


class OnlineEvaluator:
    """The labeled set of ``--eval-data`` ready for ``evaluate(encoder) -> dict`` (built once per run).

    Raises ConfigError (one line, naming ``--eval-data``) when the set is missing or cannot be read,
    so a run with a bad set fails at its start.
    """

    def __init__(self, data: str, image_size: int, channels: int, intensity: str = "raw", max_images: int = 1000,
                 k: int = KNN_K, probe: bool = False, probe_steps: int = PROBE_STEPS, batch_size: int = 64,
                 device: torch.device | str = "cpu", amp_dtype: torch.dtype | None = None):
        from .finetune_data import load_splits

        what = f"--eval-data {data}"
        if max_images < 1 or k < 1 or batch_size < 1:
            raise ConfigError(f"{what}: eval_images, eval_k and the batch size must be >= 1")
        config = FinetuneConfig(data=str(data), image_size=image_size, intensity=intensity, preload="no")
        try:
            splits = load_splits(config)
        except FinetuneError as exc:
            message = str(exc).replace(f"--data {data}", what, 1)
            raise ConfigError(message if message.startswith(what) else f"{what}: {message}") from None
        self.data, self.source = str(data), splits.source
        self.classes = [str(c) for c in splits.classes]
        self.train = _decode(splits.train, _capped(splits.train_labels, max_images, _SUBSET_SEED), what)
        val_labels = np.asarray(splits.val.labels)
        self.val = _decode(splits.val, _capped(val_labels, max_images, _SUBSET_SEED + 1), what)
        self.channels = channels
        self.k = min(k, len(self.train.labels))
        self.probe, self.probe_steps = probe, probe_steps
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.amp_dtype = amp_dtype

    def check(self, encoder: torch.nn.Module) -> None:
        """One image through ``encoder`` now (CPU, eval mode), so images that do not fit it (channels, 2-D images
        for a 3-D encoder) are a ConfigError at the start of the run, not at its first evaluation."""
        was_training = encoder.training
        try:
            encoder.eval()
            param = next(encoder.parameters(), None)
            x = self._batch(self.train.images[:1], param.device if param is not None else torch.device("cpu"),
                            _input_dtype(encoder))
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                encoder.forward_features(x)
        except (RuntimeError, ValueError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"--eval-data {self.data}: its images, shape {tuple(x.shape[1:])}, do "
                              f"not fit the encoder ({first})") from None
        finally:
            encoder.train(was_training)

    def describe(self) -> str:
        return (f"online eval on {self.source}: {len(self.train.labels)} train / {len(self.val.labels)} val images, "
                f"{len(self.classes)} classes, {self.k}-NN" + (", linear probe" if self.probe else ""))

    # ------------------------------------------------------------------------------------------
    def _batch(self, images: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Stored grey images as the encoder's input: on ``device``, in ``dtype``, with its channels."""
        x = images.to(device, non_blocking=True).to(dtype)
        return x if x.shape[1] == self.channels else x.expand(-1, self.channels, *x.shape[2:])

    @torch.no_grad()
    def features(self, encoder: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        """(N, num_features) float32 on the device: the last stage pooled over all its spatial dims."""
        out = []
        autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
                    else contextlib.nullcontext())
        dtype = _input_dtype(encoder)
        for start in range(0, images.shape[0], self.batch_size):
            x = self._batch(images[start:start + self.batch_size], self.device, dtype)
            with autocast:
                last = encoder.forward_features(x)[-1]
            out.append(last.float().flatten(2).mean(-1))
        return torch.cat(out)

    def evaluate(self, encoder: torch.nn.Module) -> dict[str, float]:
        """k-NN accuracy (and probe accuracy) of ``encoder``'s features; its mode and the RNGs are left as found."""
        t0 = time.perf_counter()
        was_training = encoder.training
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            encoder.eval()
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                train = self.features(encoder, self.train.images)
                val = self.features(encoder, self.val.images)
                train_y, val_y = self.train.labels.to(train.device), self.val.labels.to(train.device)
                result = {"knn_acc": knn_accuracy(train, train_y, val, val_y, len(self.classes), self.k)}
                if self.probe:
                    with torch.enable_grad():
                        result["probe_acc"] = probe_accuracy(train, train_y, val, val_y, len(self.classes),
                                                             self.probe_steps)
        finally:
            encoder.train(was_training)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        result["eval_seconds"] = time.perf_counter() - t0
        return result


def knn_accuracy(train: torch.Tensor, train_y: torch.Tensor, val: torch.Tensor, val_y: torch.Tensor,
                 num_classes: int, k: int = KNN_K, temperature: float = KNN_TEMPERATURE, chunk: int = 1024) -> float:
    """Temperature-weighted k-NN accuracy with cosine similarity (votes ``exp(sim / temperature)``)."""
    train = F.normalize(train.float(), dim=1)
    val = F.normalize(val.float(), dim=1)
    k = min(k, train.shape[0])
    correct = 0
    for start in range(0, val.shape[0], chunk):
        sim = val[start:start + chunk] @ train.T
        top, idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, train_y[idx], (top / temperature).exp())
        correct += int((votes.argmax(1) == val_y[start:start + chunk]).sum())
    return correct / max(1, val.shape[0])


def probe_accuracy(train: torch.Tensor, train_y: torch.Tensor, val: torch.Tensor, val_y: torch.Tensor,
                   num_classes: int, steps: int = PROBE_STEPS, lr: float = PROBE_LR,
                   weight_decay: float = PROBE_WEIGHT_DECAY) -> float:
    """Val accuracy of a logistic regression trained full-batch on ``train`` (standardised, zero init)."""
    mean, std = train.mean(0, keepdim=True), train.std(0, keepdim=True, unbiased=False) + 1e-6
    x, xv = ((train - mean) / std).detach(), ((val - mean) / std).detach()
    weight = torch.zeros(x.shape[1], num_classes, device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=x.device, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(x @ weight + bias, train_y)
        loss.backward()
        opt.step()
    with torch.no_grad():
        predicted = (xv @ weight + bias).argmax(1)
    accuracy = float((predicted == val_y).float().mean())
    return accuracy if math.isfinite(accuracy) else 0.0


__all__ = ["OnlineEvaluator", "knn_accuracy", "probe_accuracy", "KNN_K", "KNN_TEMPERATURE"]
