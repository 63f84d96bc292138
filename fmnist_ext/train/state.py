"""The state of a training run and its round trip through the checkpoint.

RunState holds everything a run changes as it trains: the model, optimizer,
scheduler (or None), weight EMA (or None), the data generator and its state
at the start of the epoch in progress, the epoch/step counters, the running
sums of the epoch in progress and the metrics history. This module is the one
place that knows the checkpoint's training fields: `to_checkpoint()` writes
them, `restore()` reads them back, `resume_problems()` is what
train --resume passes to checkpoint.load(check=...). (checkpoint.py
owns the file: integrity, format, the weights every reader needs.)

Resuming continues bit for bit: the generator is reset to its epoch-start
state, the epoch is planned again, and the batches already done are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import checkpoint
from ..data.batches import batch_count
from ..model import FashionCNN
from . import recipes
from .config import RunConfig
from .ema import WeightEMA

# What --resume needs beyond the weights; missing in a checkpoint made only for evaluate/predict.
RESUME_FIELDS = ("optimizer", "epoch", "step", "rng", "partial", "history", "world_size")


def no_sums() -> dict:
    """The running sums of an epoch not yet started."""
    return {"loss_sum": 0.0, "correct": 0, "seen": 0, "time": 0.0}


@dataclass
class RunState:
    config: RunConfig
    model: FashionCNN
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    criterion: torch.nn.Module
    ema: WeightEMA | None
    generator: torch.Generator  # the data's: shuffling and augmentation
    epoch_start_rng: torch.Tensor  # the generator's state when the epoch in progress began
    steps_per_epoch: int
    world_size: int  # the batches of an epoch depend on it and on train_images: a resume needs the same
    train_images: int
    epoch: int = 0  # epochs completed
    step: int = 0  # batches done in the epoch in progress
    partial: dict = field(default_factory=no_sums)  # running sums of the epoch in progress
    history: list = field(default_factory=list)  # one metrics record per completed epoch

    @classmethod
    def build(cls, config: RunConfig, device: torch.device, train_images: int, world_size: int) -> RunState:
        """A fresh run: seeded weights, optimizer, schedule and EMA, at epoch 0."""
        torch.manual_seed(config.seed)
        generator = torch.Generator().manual_seed(config.seed)
        model = FashionCNN(config.kernels).to(device)
        steps_per_epoch = batch_count(train_images // world_size, config.batch_size)
        optimizer = recipes.make_optimizer(config.optimizer, model.parameters(), config.lr, config.weight_decay)
        scheduler = recipes.make_scheduler(config.schedule, optimizer, config.lr, config.epochs, steps_per_epoch)
        return cls(
            config=config,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            criterion=recipes.make_criterion(config.label_smoothing),
            ema=WeightEMA(model, config.ema) if config.ema > 0 else None,
            generator=generator,
            epoch_start_rng=generator.get_state(),
            steps_per_epoch=steps_per_epoch,
            world_size=world_size,
            train_images=train_images,
        )

    # ------------------------------------------------------------------ what is evaluated

    @property
    def eval_model(self) -> torch.nn.Module:
        """The weights the run is judged by: the EMA copy when there is one."""
        return self.ema.module if self.ema is not None else self.model

    @property
    def eval_weights(self) -> str:
        return "ema" if self.ema is not None else "raw"

    # ------------------------------------------------------------------ progress

    def finish_epoch(self, record: dict) -> None:
        """Record a completed epoch; the next one starts from the generator's current state."""
        self.history.append(record)
        self.epoch, self.step, self.partial = self.epoch + 1, 0, no_sums()
        self.epoch_start_rng = self.generator.get_state()

    # ------------------------------------------------------------------ the checkpoint round trip

    def to_checkpoint(self) -> dict:
        """The checkpoint's contents (checkpoint.save adds the format tag)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "epoch": self.epoch,
            "step": self.step,
            "rng": {**rng_state(self.generator), "data": self.epoch_start_rng},
            "partial": self.partial,
            "history": self.history,
            "config": self.config.to_dict(),
            "kernels": self.config.kernels,
            "world_size": self.world_size,
            "train_images": self.train_images,
        }

    def save(self, path: Path) -> None:
        checkpoint.save(path, self.to_checkpoint())

    def restore(self, ckpt: dict, path: Path) -> None:
        """Continue from `ckpt` (read from `path` by checkpoint.load(check=resume_problems), so its
        structure is right); what only building the run can find is a CheckpointError."""
        try:
            if ckpt["step"] >= self.steps_per_epoch:
                raise ValueError(f"step {ckpt['step']} is past the {self.steps_per_epoch} batches of an epoch")
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if (self.scheduler is None) != (ckpt["scheduler"] is None):
                raise ValueError("the learning-rate schedule state does not match the settings")
            if self.scheduler is not None:
                self.scheduler.load_state_dict(ckpt["scheduler"])
            if self.ema is not None:
                self.ema.load_state_dict(ckpt["ema"])
            set_rng_state(ckpt["rng"], self.generator)
        except (KeyError, ValueError, RuntimeError, TypeError, IndexError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise checkpoint.CheckpointError(f"{path}: cannot resume from it ({first})") from None
        self.epoch, self.step, self.history = ckpt["epoch"], ckpt["step"], list(ckpt["history"])
        self.partial = dict(ckpt["partial"])
        self.epoch_start_rng = self.generator.get_state()  # the "data" state restored above


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def resume_problems(ck: dict) -> list[str]:
    """What is wrong with `ck`'s settings and training state for a resume (empty when nothing is)."""
    problems = recipes.config_problems(ck.get("config")) if "config" in ck else ["settings (config) missing"]
    missing = [f"{key} missing (needed to resume)" for key in RESUME_FIELDS if key not in ck]
    if missing:
        return problems + missing
    opt = ck["optimizer"]
    if not isinstance(opt, dict) or not {"state", "param_groups"} <= set(opt):
        problems.append("optimizer is not an optimizer state_dict")
    if ck.get("scheduler") is not None and not isinstance(ck["scheduler"], dict):
        problems.append("scheduler is not a scheduler state_dict")
    config = ck.get("config") if isinstance(ck.get("config"), dict) else None
    ema_decay = config.get("ema", 0.0) if config is not None else 0.0
    if ck.get("ema") is None and isinstance(ema_decay, (int, float)) and ema_decay > 0:
        problems.append("the settings use --ema but the weight average is missing")
    epoch, step = ck["epoch"], ck["step"]
    epochs = config.get("epochs") if config is not None else None
    if not _is_int(epoch) or epoch < 0 or (_is_int(epochs) and epoch > epochs):
        problems.append(f"epoch {epoch!r} is not in [0, {epochs}]")
    if not _is_int(step) or step < 0:
        problems.append(f"step {step!r} is not a non-negative integer")
    if not isinstance(ck["history"], list) or (_is_int(epoch) and len(ck["history"]) != epoch):
        problems.append(f"history does not hold one record per completed epoch ({epoch!r})")
    rng = ck["rng"]
    if (
        not isinstance(rng, dict)
        or not all(isinstance(rng.get(k), torch.Tensor) and rng[k].dtype == torch.uint8 for k in ("torch", "data"))
        or not isinstance(rng.get("cuda"), list)
    ):
        problems.append("rng is not a set of generator states")
    part = ck["partial"]
    if not isinstance(part, dict) or not all(
        isinstance(part.get(k), (int, float)) for k in ("loss_sum", "correct", "seen", "time")
    ):
        problems.append("partial (the epoch in progress) is not a set of running sums")
    ws = ck["world_size"]
    if not _is_int(ws) or ws < 1:
        problems.append(f"world_size {ws!r} is not a positive integer")
    return problems


def rng_state(data_generator: torch.Generator) -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "data": data_generator.get_state(),
    }


def set_rng_state(state: dict, data_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    data_generator.set_state(state["data"])
