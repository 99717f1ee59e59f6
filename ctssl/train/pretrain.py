"""The pre-training loop shared by SparK and the contrastive methods.

``run_pretraining(cfg)`` checks every input before it writes anything, then trains with a
per-step learning-rate / weight-decay schedule, optional bf16 autocast, gradient clipping,
DDP when launched by torchrun, JSON-lines (+ TensorBoard) logs, pictures, and atomic
checkpoints from which ``resume`` continues bit for bit: model, optimizer, scaler, data
position, and every RNG the run draws from.

Around the steps: online k-NN evaluation of the backbone on a labeled set (``eval_data``,
``online_eval``; rank 0, every ``eval_every`` steps and at the end, RNGs untouched), optional
Weights & Biases, a progress line with images/s and ETA, and a closing summary (total time, mean
images/s without the warm-up step). A NaN/inf loss stops the run naming its first step and the
outputs that were non-finite; no checkpoint is written from non-finite state.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..atomic import OutputError, check_output_dir, copy_file, remove_stale_temps, write_text
from . import checkpoint as ckpt_io
from .checkpoint import FINAL, FORMAT, LAST, VERSION, CheckpointError, load_checkpoint, save_atomic
from .config import SPARK_FIELDS, TRAINER_HPARAMS, ConfigError, PretrainConfig, config_from_dict
from .distributed import (
    DistContext,
    ResumableBatchSampler,
    SeededItems,
    all_gather_object,
    barrier,
    broadcast_object,
    convert_batchnorm,
    derive_seed,
    init_distributed,
    mean_across_ranks,
    rng_state,
    seed_everything,
    seeded_rng,
    set_rng_state,
    shutdown,
    wrap_ddp,
)
from .logger import LOG_FILE, Progress, RunLogger, Throughput, WandbSettings, format_duration, truncate_log
from .optim import build_optimizer, clip_grad_norm
from .schedule import TrainingSchedule, build_schedule
from .viz import eval_records, plot_eval_curve, plot_loss_curve, save_image_grid
from .weights import apply_init

CONFIG_FILE = "config.json"
VIS_DIR = "vis"
LOSS_CURVE = "loss_curve.png"
EVAL_CURVE = "eval_curve.png"
_VIS_SEED = 0x51C7


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN or infinite)."""


@dataclass(frozen=True)
class RunPlan:
    """The numbers a run derives from its config, data set size and world size."""

    dataset_len: int
    global_batch: int
    steps_per_epoch: int
    total_steps: int
    epochs: int
    warmup_steps: int
    peak_lr: float


def make_plan(cfg: PretrainConfig, dataset_len: int, world_size: int = 1) -> RunPlan:
    global_batch = cfg.global_batch(world_size)
    steps_per_epoch = dataset_len // global_batch
    if steps_per_epoch < 1:
        raise ConfigError(f"the data set {cfg.data} has {dataset_len} images, fewer than one global batch of "
                          f"{global_batch} (batch_size {cfg.batch_size} x {world_size} ranks)")
    total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    epochs = math.ceil(total / steps_per_epoch)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_epochs * steps_per_epoch)
    return RunPlan(dataset_len, global_batch, steps_per_epoch, total, epochs, min(max(0, warmup), total),
                   cfg.peak_lr(world_size))


# ---------------------------------------------------------------------------------------------
# building blocks (also used by tests and other tools)
# ---------------------------------------------------------------------------------------------

def method_hparams(cfg: PretrainConfig, defaults: dict[str, Any], plan: RunPlan | None = None) -> dict[str, Any]:
    """Keyword arguments for ``create_method``: the trainer settings the method knows, then ``cfg.hparams``."""
    clash = sorted(set(cfg.hparams) & (set(TRAINER_HPARAMS) | {"steps_per_epoch"}))
    if clash:
        raise ConfigError(f"hparams {', '.join(clash)} are trainer settings: set "
                          f"{', '.join(TRAINER_HPARAMS.get(k, k) for k in clash)} directly")
    values = {key: getattr(cfg, name) for key, name in TRAINER_HPARAMS.items()}
    values["input_size"] = cfg.input_size  # crop_size for 3-D encoders
    if plan is not None:
        values["epochs"] = plan.epochs
        values["steps_per_epoch"] = plan.steps_per_epoch
    hparams = {k: v for k, v in values.items() if k in defaults}
    hparams.update({name: getattr(cfg, name) for name in SPARK_FIELDS if getattr(cfg, name) is not None})
    hparams.update(cfg.hparams)
    return hparams


def build_method(cfg: PretrainConfig, plan: RunPlan | None = None) -> torch.nn.Module:
    """The ``ctssl.ssl`` method of ``cfg`` around a fresh ``cfg.arch`` encoder (CPU, fp32)."""
    from ctssl.models import create_encoder
    from ctssl.ssl import create_method

    from .config import method_default_hparams

    encoder = create_encoder(cfg.arch, in_chans=cfg.in_chans, drop_path_rate=cfg.drop_path_rate)
    hparams = method_hparams(cfg, method_default_hparams(cfg.method), plan)
    try:
        return create_method(cfg.method, encoder, backend=cfg.backend, **hparams)
    except ValueError as exc:  # unknown hparam, bad value, unusable backend
        raise ConfigError(str(exc)) from None


def open_store(cfg: PretrainConfig):
    """The prepared slice store ``cfg.data``, or ConfigError naming what is wrong with it."""
    from ctssl.data import SliceStore

    if not cfg.data:
        raise ConfigError("no data directory given (--data PREPARED_DIR, the output of ctssl-prepare)")
    root = Path(cfg.data)
    if not root.exists():
        raise ConfigError(f"data directory {root} does not exist")
    if not root.is_dir():
        raise ConfigError(f"data directory {root} is not a directory")
    try:
        store = SliceStore(root)
    except FileNotFoundError:
        raise ConfigError(f"data directory {root} is not a prepared slice store (run ctssl-prepare on the "
                          f"DICOM tree first)") from None
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"data directory {root} cannot be read as a slice store: {exc}") from None
    if len(store) == 0:
        raise ConfigError(f"data directory {root} is empty: the store holds no slices")
    return store


def pretrain_dataset(cfg: PretrainConfig, store, transform=None):
    """The data set of ``cfg``'s encoder: slices (``PretrainDataset``) for 2-D encoders, random ``crop_size^3``
    crops of the series resampled to ``volume_spacing`` (``VolumeDataset``) for 3-D ones."""
    from ctssl.data import PretrainDataset
    from ctssl.data.volumes import VolumeDataset

    try:
        if cfg.spatial_dims == 3:
            return VolumeDataset(store, crop=cfg.crop_size, spacing=cfg.volume_spacing, channels=cfg.in_chans,
                                 intensity=cfg.intensity, transform=transform, crops_per_volume=cfg.crops_per_volume)
        return PretrainDataset(store, size=cfg.image_size, channels=cfg.in_chans, intensity=cfg.intensity,
                               transform=transform)
    except ValueError as exc:
        raise ConfigError(f"data: {exc}") from None


def amp_dtype(cfg: PretrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPU for ``auto``; none on CPU unless asked for (bf16 only)."""
    mode = cfg.amp
    if mode == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if mode == "none":
        return None
    if mode == "fp16" and device.type != "cuda":
        raise ConfigError("amp fp16 needs a GPU; use bf16 or none on the CPU")
    return torch.bfloat16 if mode == "bf16" else torch.float16


def to_device(batch, device: torch.device, channels_last: bool = False):
    """Move a (nested list/tuple/dict of) tensor batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        batch = batch.to(device, non_blocking=True)
        if channels_last and batch.dim() == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device, channels_last) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device, channels_last) for k, v in batch.items()}
    return batch


def resolve_resume(cfg: PretrainConfig, resume: str | os.PathLike | bool | None) -> Path | None:
    """None/False: a fresh run; True or "": OUT/checkpoint_last.pt; else the given path."""
    if resume is None or resume is False:
        return None
    if resume is True or str(resume) == "":
        path = Path(cfg.out) / LAST
        if not path.exists():
            raise CheckpointError(f"nothing to resume: {path} does not exist")
        return path
    return Path(resume)


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------

def run_pretraining(cfg: PretrainConfig, resume: str | os.PathLike | bool | None = None,
                    overwrite: bool = False) -> Path:
    """Pre-train ``cfg.method`` on ``cfg.data``; returns ``OUT/checkpoint_final.pt``.

    Raises ConfigError / CheckpointError / BackendUnavailableError (all ValueErrors) for bad
    input before anything in ``cfg.out`` is written. ``resume`` continues a run (see
    ``resolve_resume``); without it an OUT that already holds a run needs ``overwrite``.
    Launched by torchrun (WORLD_SIZE > 1) it trains with DDP; rank 0 logs and saves.
    """
    cfg = dataclasses.replace(cfg, hparams=dict(cfg.hparams)).validate()
    ctx = init_distributed(cfg.device)
    try:
        return _Run(cfg, ctx, resolve_resume(cfg, resume), overwrite).train()
    finally:
        shutdown(ctx)


class _Run:
    def __init__(self, cfg: PretrainConfig, ctx: DistContext, resume_path: Path | None, overwrite: bool):
        self.cfg, self.ctx = cfg, ctx
        self.out = Path(cfg.out)
        self.device = ctx.device

        # ---- every check that can fail on user input, before anything is written ----
        try:
            check_output_dir(self.out, "--out")
        except OutputError as exc:
            raise ConfigError(str(exc)) from None
        self._check_wandb()
        self.resumed = load_checkpoint(resume_path) if resume_path is not None else None
        self.last_good: tuple[Path, int] | None = None  # a checkpoint known to hold finite state, and its step
        if self.resumed is not None:
            self._check_compatible(self.resumed, resume_path)
            self.last_good = (resume_path, int(self.resumed["step"]))
        self.store = open_store(cfg)
        self.dataset = pretrain_dataset(cfg, self.store)  # its transform comes from the method, built below
        self.plan = make_plan(cfg, len(self.dataset), ctx.world_size)
        if cfg.backend != "auto":  # auto always finds one; it is resolved below, once the encoder's ops are known
            from ctssl.sparse import get_backend

            get_backend(cfg.backend, self.device, training=True)  # BackendUnavailableError: unknown, unusable
        self.amp_dtype = amp_dtype(cfg, self.device)
        if self.resumed is None and not overwrite and ((self.out / LAST).exists() or (self.out / FINAL).exists()):
            raise ConfigError(f"{self.out} already holds a run ({LAST}); resume it with --resume, "
                              f"or choose another --out (or pass --overwrite)")
        seed_everything(cfg.seed)  # the same initial weights on every rank
        self.method = build_method(cfg, self.plan)
        self.backend_pick = self._resolve_auto_backend()
        self.init_lines = apply_init(self.method, cfg, resuming=self.resumed is not None,
                                     log=print if ctx.is_main else None)  # --init: before the optimizer exists
        try:
            self.dataset.transform = self.method.train_transform(cfg.input_size)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self._build_evaluator()

    def _resolve_auto_backend(self) -> str | None:
        """SparK's ``auto`` resolved once, on rank 0 (its self-check and timing run there), and that backend set on
        every rank: ranks timing on their own could pick differently when two backends are close. Returns what
        the start line says (None: nothing to resolve). The run's config keeps ``auto``, so a resume elsewhere
        picks again."""
        cfg, ctx = self.cfg, self.ctx
        if cfg.method != "spark" or cfg.backend != "auto":
            return None
        pick = None
        if ctx.is_main:
            from ctssl.sparse.backends import explain_auto

            name = self.method.engine(self.device).name  # with SparK's own rule for volumes
            explained = explain_auto(self.device, check=False, ops=self.method.backbone.sparse_ops)  # cached now
            why = (explained.reason() if explained.backend.name == name else
                   f"auto's pick {explained.backend.name} takes no volumes, so {name} runs them")
            pick = (name, why)
        name, why = broadcast_object(ctx, pick)
        self.method.backend = name
        return f"auto -> {name} ({why})"

    def _check_wandb(self) -> None:
        """``--wandb`` without the wandb package: ConfigError naming the extra to install."""
        if self.cfg.wandb:
            try:
                WandbSettings.check()
            except ImportError as exc:
                raise ConfigError(str(exc)) from None

    def _build_evaluator(self) -> None:
        """The ``--eval-data`` set loaded now: missing or unreadable, it is a ConfigError at the start, not after
        hours of training. Decoded on rank 0 only; its verdict is shared with every rank."""
        cfg, ctx = self.cfg, self.ctx
        self.evaluator = None
        if not cfg.eval_data:
            return
        error = None
        if ctx.is_main:
            from .online_eval import OnlineEvaluator

            try:
                self.evaluator = OnlineEvaluator(cfg.eval_data, cfg.input_size, cfg.in_chans, cfg.intensity,
                                                 max_images=cfg.eval_images, k=cfg.eval_k, probe=cfg.eval_probe,
                                                 batch_size=max(cfg.batch_size, 32), device=self.device,
                                                 amp_dtype=self.amp_dtype)
                self.evaluator.check(self.method.backbone)
            except ConfigError as exc:
                error = str(exc)
        error = broadcast_object(ctx, error)
        if error is not None:
            raise ConfigError(error)

    def _check_compatible(self, saved: dict, path: Path) -> None:
        for key in ("method", "arch", "in_chans"):
            if saved[key] != getattr(self.cfg, key):
                raise CheckpointError(f"cannot resume {path}: it was trained with {key}={saved[key]!r}, "
                                      f"this run asks for {getattr(self.cfg, key)!r}")

    # ------------------------------------------------------------------------------------------
    def train(self) -> Path:
        cfg, ctx, plan = self.cfg, self.ctx, self.plan
        if ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(self.out)  # of a checkpoint write that was killed
        barrier(ctx)

        method = self.method
        if ctx.distributed:
            method = convert_batchnorm(method, self.device)
        method.to(self.device)
        channels_last = cfg.channels_last and self.device.type == "cuda" and cfg.spatial_dims == 2  # 4-D formats only
        if channels_last:
            method.to(memory_format=torch.channels_last)
        self.method = method
        optimizer = build_optimizer(cfg.optimizer, method.param_groups(cfg.weight_decay), plan.peak_lr,
                                    cfg.weight_decay, betas=cfg.betas, momentum=cfg.momentum, eps=cfg.eps,
                                    lars_trust=cfg.lars_trust)
        schedule = build_schedule(plan.peak_lr, plan.total_steps, plan.warmup_steps,
                                  cfg.min_lr_ratio * plan.peak_lr, cfg.weight_decay, cfg.weight_decay_end)
        scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None

        step, epoch, batch_in_epoch = 0, 0, 0
        notes: list[str] = []
        if self.resumed is not None:
            step, epoch, batch_in_epoch, notes = self._restore(self.resumed, method, optimizer, schedule, scaler)

        sampler = ResumableBatchSampler(plan.dataset_len, cfg.batch_size, ctx.rank, ctx.world_size, cfg.seed)
        loader_gen = torch.Generator().manual_seed(derive_seed(cfg.seed, ctx.rank, 0x10AD))
        loader = DataLoader(SeededItems(self.dataset), batch_sampler=sampler, num_workers=cfg.workers,
                            pin_memory=self.device.type == "cuda", persistent_workers=cfg.workers > 0,
                            generator=loader_gen)
        vis_batch = self._vis_batch() if method_has_visualize(method) else None

        if ctx.is_main:
            if self.resumed is not None:
                truncate_log(self.out / LOG_FILE, step)
            self._write_config()
        wandb = (WandbSettings(cfg.wandb_project, cfg.wandb_mode, dataclasses.asdict(cfg)) if cfg.wandb else None)
        logger = RunLogger(self.out, enabled=ctx.is_main, tensorboard=cfg.tensorboard, wandb=wandb)
        if logger.tensorboard_reason and cfg.tensorboard:
            logger.event("note", message=logger.tensorboard_reason)
        logger.event("resume" if self.resumed is not None else "start", step=step, epoch=epoch,
                     world_size=ctx.world_size, device=str(self.device), total_steps=plan.total_steps,
                     steps_per_epoch=plan.steps_per_epoch, global_batch=plan.global_batch, peak_lr=plan.peak_lr,
                     notes=notes)

        # RNG of the training steps (masks, drop-path, ...): restored, or seeded per rank
        if self.resumed is None or not self._restore_rng(self.resumed):
            if self.resumed is not None:
                logger.event("note", message="the checkpoint's RNG states are for another world size: reseeded")
            seed_everything(derive_seed(cfg.seed, ctx.rank, 0x7EA1))

        model = wrap_ddp(method, ctx, cfg.find_unused_parameters)
        model.train()
        progress = Progress(plan.total_steps, step, enabled=ctx.is_main and cfg.progress)
        if ctx.is_main and logger.tensorboard_reason and cfg.tensorboard:
            progress.write(f"ctssl-train: {logger.tensorboard_reason}")
        too_large = cpu_warning(cfg, plan, self.device)
        if ctx.is_main and too_large:
            progress.write(f"ctssl-train: {too_large}")
        if ctx.is_main and cfg.progress:
            amp = "off" if self.amp_dtype is None else str(self.amp_dtype).replace("torch.", "")
            progress.write(f"{cfg.method} {cfg.arch}: {plan.dataset_len} images, {plan.steps_per_epoch} steps/epoch, "
                           f"{plan.total_steps} steps, global batch {plan.global_batch} on {ctx.world_size} "
                           f"process(es), peak lr {plan.peak_lr:.3g}, {self.device}, "
                           f"backend {self.backend_pick or cfg.backend}, "
                           f"amp {amp}" + (f"; resuming at step {step}" if step else ""))
        window = self.window = _Window(self.device)
        throughput = self.throughput = Throughput(plan.global_batch)
        self.first_step = step
        self.last_eval_step = self._last_eval_step(step)
        if ctx.is_main and self.evaluator is not None and cfg.progress:
            progress.write(f"ctssl-train: {self.evaluator.describe()}, every {cfg.eval_every} steps")
        try:
            while step < plan.total_steps:
                if batch_in_epoch >= plan.steps_per_epoch:
                    epoch, batch_in_epoch = epoch + 1, 0
                sampler.set_epoch(epoch, batch_in_epoch)
                for batch in loader:
                    lr, wd = schedule.apply(optimizer, step)
                    batch = to_device(batch, self.device, channels_last)
                    out = self._train_step(model, method, optimizer, scaler, batch, step)
                    method.after_step(step, plan.total_steps)
                    step += 1
                    batch_in_epoch += 1
                    window.add(out, step)
                    throughput.step()
                    if step % cfg.log_every == 0 or step == plan.total_steps:
                        record = self._log(logger, window, step, epoch, lr, wd)
                        progress.update(0, **self._progress_fields(record, step))
                    if step % cfg.vis_every == 0:
                        self._visualize(method, vis_batch, step)
                    if step % cfg.eval_every == 0 or step == plan.total_steps:
                        self._online_eval(method, logger, step)
                    if step % cfg.ckpt_every == 0 and step < plan.total_steps:
                        self._save(LAST, method, optimizer, schedule, scaler, sampler, step, epoch, batch_in_epoch)
                    progress.update(1)
                    if step >= plan.total_steps:
                        break
                else:
                    continue
                break
            self._online_eval(method, logger, step)  # a run resumed at its end: evaluated unless it already was
            final = self._save(FINAL, method, optimizer, schedule, scaler, sampler, step, epoch, batch_in_epoch)
            if ctx.is_main:
                copy_file(final, self.out / LAST)
                if vis_batch is not None and step % cfg.vis_every != 0:
                    self._visualize(method, vis_batch, step, collective=False)
                plot_loss_curve(self.out / LOG_FILE, self.out / LOSS_CURVE, title=f"{cfg.method} pre-training loss")
                mean = throughput.mean_images_per_s()
                logger.event("end", step=step, epoch=epoch, checkpoint=str(final), seconds=throughput.elapsed,
                             eval_seconds=throughput.paused_seconds, images_per_s=mean)
                progress.write(f"ctssl-train: done: {throughput.summary(self.first_step)}")
            barrier(ctx)
        finally:
            progress.close()
            logger.close()
        return self.out / FINAL

    # ------------------------------------------------------------------------------------------
    def _train_step(self, model, method, optimizer, scaler, batch, step: int) -> dict:
        optimizer.zero_grad(set_to_none=True)
        autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            out = model(batch)
        loss = out["loss"]
        if scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()
        method.on_after_backward(step)
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = clip_grad_norm(method.parameters(), self.cfg.grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        logs = {k: v.detach() for k, v in out.items() if isinstance(v, torch.Tensor) and v.numel() == 1}
        if grad_norm is not None:
            logs["grad_norm"] = grad_norm.detach()
        return logs

    def _log(self, logger: RunLogger, window: "_Window", step: int, epoch: int, lr: float, wd: float) -> dict:
        detail = None if window.finite() else window.nonfinite_detail()
        means, nonfinite, steps, seconds = window.flush(self.ctx)
        if nonfinite:
            where = (f"at step {detail[0]} (non-finite: {', '.join(detail[1])})" if detail and detail[0]
                     else f"between steps {step - steps + 1} and {step}")
            raise TrainingError(f"the loss became NaN or infinite {where}; lower the learning rate or check the "
                                f"data ({self._last_good_text()})")
        record = {"epoch": epoch, "lr": lr, "weight_decay": wd, **means,
                  "images_per_s": self.plan.global_batch * steps / max(seconds, 1e-9)}
        logger.log(step, record)
        return record

    def _progress_fields(self, record: dict, step: int) -> dict[str, str]:
        """The progress line's loss, images/s (this log window), ETA and latest k-NN accuracy."""
        fields = {"loss": f"{record['loss']:.4g}", "img_s": f"{record['images_per_s']:.1f}"}
        eta = self.throughput.eta_seconds(self.plan.total_steps - step)
        if eta is not None:
            fields["eta"] = format_duration(eta)
        if getattr(self, "last_knn", None) is not None:
            fields["knn"] = f"{self.last_knn:.3f}"
        return fields

    # ------------------------------------------------------------------------------------------
    def _last_eval_step(self, step: int) -> int | None:
        """The step of the latest evaluation in log.jsonl (a resumed run; rank 0's answer on every rank)."""
        last = None
        if self.ctx.is_main and self.cfg.eval_data and self.resumed is not None:
            steps = [r["step"] for r in eval_records(self.out / LOG_FILE) if r["step"] <= step]
            last = max(steps) if steps else None
        return broadcast_object(self.ctx, last)

    def _online_eval(self, method, logger: RunLogger, step: int) -> None:
        """k-NN (and probe) accuracy of the backbone at ``step`` on rank 0, the others waiting at a barrier;
        once per step (a resumed run does not repeat the evaluation its log already holds)."""
        if not self.cfg.eval_data or self.last_eval_step == step:
            return
        self._check_finite(method, step)  # NaN weights are reported as such, not as a chance-level accuracy
        paused_before = self.throughput.paused_seconds
        with self.throughput.paused():
            if self.ctx.is_main:
                result = self.evaluator.evaluate(method.backbone)
                self.last_knn = result["knn_acc"]
                logger.log_eval(step, {**result, "knn_k": self.evaluator.k,
                                       "eval_train_images": len(self.evaluator.train.labels),
                                       "eval_val_images": len(self.evaluator.val.labels)})
                plot_eval_curve(self.out / LOG_FILE, self.out / EVAL_CURVE,
                                title=f"{self.cfg.method} online evaluation ({self.evaluator.k}-NN)")
            barrier(self.ctx)
        # the next logged images/s is of training alone (one clock: the throughput's own pause)
        self.window.start += self.throughput.paused_seconds - paused_before
        self.last_eval_step = step

    def _vis_batch(self):
        """A fixed batch for pictures: the first images, augmented with fixed seeds."""
        from torch.utils.data import default_collate

        n = min(self.cfg.vis_images, len(self.dataset))
        items = SeededItems(self.dataset)
        return default_collate([items[(i, _VIS_SEED + i)] for i in range(n)])

    def _visualize(self, method, vis_batch, step: int, collective: bool = True) -> None:
        """SparK's picture (on every rank: its sync BN needs all of them; rank 0 saves) and the loss curve."""
        cfg, ctx = self.cfg, self.ctx
        if vis_batch is not None and (collective or not ctx.distributed):
            batch = to_device(vis_batch, self.device)
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices), seeded_rng(_VIS_SEED), torch.no_grad():
                autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
                            else contextlib.nullcontext())
                with autocast:
                    picture = method.visualize(batch)
            if picture is not None and ctx.is_main:
                n = batch.shape[0] if isinstance(batch, torch.Tensor) else None
                columns = n if n and picture.dim() == 4 and picture.shape[0] % n == 0 else None
                save_image_grid(picture, self.out / VIS_DIR / f"step_{step:06d}.png", columns=columns)
        if ctx.is_main:
            plot_loss_curve(self.out / LOG_FILE, self.out / LOSS_CURVE, title=f"{cfg.method} pre-training loss")

    def _write_config(self) -> None:
        text = json.dumps({"config": dataclasses.asdict(self.cfg), "plan": dataclasses.asdict(self.plan),
                           "world_size": self.ctx.world_size}, indent=2, default=str)
        write_text(self.out / CONFIG_FILE, text + "\n")

    # ------------------------------------------------------------------------------------------
    def _save(self, name: str, method, optimizer, schedule: TrainingSchedule, scaler, sampler, step: int,
              epoch: int, batch_in_epoch: int) -> Path:
        """Checkpoint ``name`` atomically (rank 0); every rank contributes its RNG state.

        Non-finite state is never saved: the loss is checked only every ``log_every`` steps, so the
        losses since the last log and the weights are checked here first.
        """
        self._check_finite(method, step)
        if batch_in_epoch >= self.plan.steps_per_epoch:
            epoch, batch_in_epoch = epoch + 1, 0
        rngs = all_gather_object(self.ctx, rng_state())
        path = self.out / name
        if self.ctx.is_main:
            state = {
                "format": FORMAT, "version": VERSION, "method": self.cfg.method, "arch": self.cfg.arch,
                "in_chans": self.cfg.in_chans, "config": dataclasses.asdict(self.cfg), "step": step, "epoch": epoch,
                "model": method.state_dict(), "backbone": ckpt_io.plain_state_dict(method.backbone),
                "optimizer": optimizer.state_dict(), "schedules": schedule.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "sampler": {**sampler.state_dict(batch_in_epoch), "epoch": epoch,
                            "samples": batch_in_epoch * self.plan.global_batch},
                "rng": rngs, "world_size": self.ctx.world_size,
            }
            save_atomic(state, path)
        barrier(self.ctx)
        self.last_good = (path, step)
        return path

    def _check_finite(self, method, step: int) -> None:
        """TrainingError (on every rank alike) once the loss since the last log or the weights are NaN or inf."""
        loss_finite = self.window.finite()
        finite = loss_finite and bool(torch.stack(
            [torch.isfinite(t).all() for t in method.state_dict().values() if t.is_floating_point()]).all())
        if mean_across_ranks(self.ctx, torch.tensor([0.0 if finite else 1.0], device=self.device)).item() > 0:
            if not loss_finite:
                first, keys = self.window.nonfinite_detail()
                what = (f"the loss became NaN or infinite {f'at step {first}' if first else f'by step {step}'} "
                        f"(non-finite: {', '.join(keys)}; found before writing the checkpoint of step {step})")
            elif not finite:
                bad = next(k for k, t in method.state_dict().items()
                           if t.is_floating_point() and not bool(torch.isfinite(t).all()))
                what = f"the weights became NaN or infinite by step {step} (first: {bad})"
            else:
                what = f"the loss or the weights became NaN or infinite on another rank by step {step}"
            raise TrainingError(f"{what}; lower the learning rate or check the data ({self._last_good_text()})")

    def _last_good_text(self) -> str:
        if self.last_good is None:
            return "no checkpoint was written before it"
        path, step = self.last_good
        return f"last good checkpoint: {path} (step {step})"

    def _restore(self, saved: dict, method, optimizer, schedule: TrainingSchedule, scaler):
        notes: list[str] = []
        try:
            method.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0]
            raise CheckpointError(f"the checkpoint does not match this method/optimizer: {first}") from None
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        if saved.get("schedules"):
            changed = schedule.differences(saved["schedules"])
            if changed:
                notes.append("schedule changed: " + "; ".join(changed))
        step, epoch = int(saved["step"]), int(saved["epoch"])
        sampler_state = saved.get("sampler") or {}
        samples = int(sampler_state.get("samples", 0))
        batch = samples // self.plan.global_batch
        if samples % self.plan.global_batch:
            notes.append(f"global batch changed: resuming at batch {batch} of epoch {epoch} (sample {samples})")
        if sampler_state.get("dataset_len") not in (None, self.plan.dataset_len):
            notes.append(f"data set size changed from {sampler_state['dataset_len']} to {self.plan.dataset_len}: "
                         f"the data order differs from the original run")
        return step, epoch, batch, notes

    def _restore_rng(self, saved: dict) -> bool:
        states = saved.get("rng") or []
        if len(states) != self.ctx.world_size:
            return False
        set_rng_state(states[self.ctx.rank])
        return True


# forward+backward cost of each encoder relative to ResNet-50 (their forward GFLOPs at 224 px: 1.8, 3.6, 4.1, 7.8, 11.5)
_ARCH_COST = {"resnet18": 0.45, "resnet34": 0.9, "resnet50": 1.0, "resnet101": 1.9, "resnet152": 2.8}
CPU_IMAGE_BUDGET = 20_000
"""Images (in ResNet-50 / 224 px equivalents) beyond which a CPU run gets a warning: hours at least."""


def cpu_warning(cfg: PretrainConfig, plan: RunPlan, device: torch.device) -> str | None:
    """A warning for a run sized for a GPU (the ``paper`` preset) that is about to start on the CPU."""
    if device.type != "cpu":
        return None
    pixels = cfg.input_size ** cfg.spatial_dims / 224 ** 2  # a volume crop counts as its voxels' worth of images
    images = plan.total_steps * plan.global_batch * pixels * _ARCH_COST.get(cfg.arch, 1.0)
    if images < CPU_IMAGE_BUDGET:
        return None
    return (f"warning: this run ({cfg.arch}, {cfg.input_size} px, {plan.total_steps} steps of {plan.global_batch} "
            f"images) is sized for a GPU and will take very long on the CPU; for a CPU demo use --preset toy")


def method_has_visualize(method) -> bool:
    return type(method).visualize is not getattr(_base_method_class(), "visualize", None)


def _base_method_class():
    from ctssl.ssl.base import SSLMethod

    return SSLMethod


class _Window:
    """Scalar outputs summed on the device between log steps (one host sync per log, not per step)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.first_bad: dict[str, torch.Tensor] = {}  # per output: the first step it was NaN/inf (-1: none)
        self.steps = 0
        self.start = time.perf_counter()

    def add(self, logs: dict[str, torch.Tensor], step: int | None = None) -> None:
        """Sum this step's outputs; ``step`` (1-based) is kept, on the device, where an output first is NaN/inf."""
        for key, value in logs.items():
            value = value.float().reshape(())
            self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
            if step is not None:
                first = self.first_bad.get(key)
                if first is None:
                    first = torch.full((), -1, dtype=torch.int64, device=value.device)
                self.first_bad[key] = torch.where(~torch.isfinite(value) & (first < 0), step, first)
        self.steps += 1

    def nonfinite_detail(self) -> tuple[int | None, list[str]]:
        """(first step with a NaN/inf output, the outputs that were NaN/inf at it): read only on failure."""
        firsts = {k: int(v) for k, v in self.first_bad.items() if int(v) >= 0}
        if not firsts:
            return None, sorted(k for k, v in self.sums.items() if not bool(torch.isfinite(v)))
        first = min(firsts.values())
        return first, sorted(k for k, v in firsts.items() if v == first)

    def finite(self) -> bool:
        """Whether every summed output since the last flush is finite (one host sync)."""
        return not self.sums or bool(torch.isfinite(torch.stack(list(self.sums.values()))).all())

    def flush(self, ctx: DistContext) -> tuple[dict[str, float], bool, int, float]:
        keys = sorted(self.sums)
        values = torch.stack([self.sums[k] for k in keys]) / max(1, self.steps)
        values = mean_across_ranks(ctx, values.to(self.device))
        means = dict(zip(keys, values.tolist()))
        nonfinite = not all(math.isfinite(v) for v in means.values())
        steps, seconds = self.steps, time.perf_counter() - self.start
        self.sums, self.first_bad, self.steps, self.start = {}, {}, 0, time.perf_counter()
        return means, nonfinite, steps, seconds


def load_run_config(path: str | os.PathLike) -> PretrainConfig:
    """The config a checkpoint was trained with (for ``--resume`` without repeating the flags)."""
    saved = load_checkpoint(path)
    try:
        return config_from_dict(saved["config"], source=f"{path} config")
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None


def export_backbone(source, path: str | os.PathLike) -> Path:
    """Write the backbone as a plain state_dict (torchvision / timm keys); see ``checkpoint.export_backbone``."""
    return ckpt_io.export_backbone(source, path)


__all__ = ["PretrainConfig", "RunPlan", "TrainingError", "run_pretraining", "make_plan", "build_method",
           "method_hparams", "open_store", "pretrain_dataset", "export_backbone", "load_run_config", "to_device",
           "amp_dtype"]
