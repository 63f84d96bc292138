"""The two steps of the training loop: one epoch of training, and the
evaluation of a split (with the epoch's metrics record built from both).

An epoch is planned up front from the data generator (batches.plan_epoch:
order, crops, flips), so an epoch resumed at batch k skips exactly the first
k batches of the same plan. Under DDP each process trains its shard; the sums
are added up over processes only for the record.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.batches import Batches, eval_batches, plan_epoch
from .distributed import Dist, all_reduce_sum
from .divergence import check_loss
from .interrupt import StopRequest
from .state import RunState
from .step import train_step


@dataclass
class EpochSums:
    """One process's running sums of an epoch (tensors stay on the device: no sync per batch)."""

    loss_sum: torch.Tensor  # float64: sum of per-image losses
    correct: torch.Tensor  # int64
    seen: int
    time: float  # seconds spent training (evaluation excluded)

    @classmethod
    def from_partial(cls, partial: dict, device) -> EpochSums:
        """Continue the sums a checkpoint saved mid-epoch (zeros for a new epoch)."""
        return cls(
            torch.tensor(partial["loss_sum"], dtype=torch.float64, device=device),
            torch.tensor(partial["correct"], dtype=torch.long, device=device),
            partial["seen"],
            partial["time"],
        )

    def to_partial(self) -> dict:
        return {
            "loss_sum": self.loss_sum.item(),
            "correct": int(self.correct.item()),
            "seen": self.seen,
            "time": self.time,
        }


def train_epoch(
    state: RunState,
    net: torch.nn.Module,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    d: Dist,
    device: torch.device,
    stop: StopRequest,
    progress: bool,
    step=None,
) -> EpochSums | None:
    """Train epoch `state.epoch` from batch `state.step` to its end; return this process's sums.
    None when a stop was requested before the end: state.step and state.partial then say where.
    `step(x, y) -> (logits, loss)` runs one training step (default: the eager
    train_step; a GraphedStep with --cuda-graphs)."""
    from tqdm import tqdm

    config = state.config
    state.generator.set_state(state.epoch_start_rng)
    augment = state.epoch < config.augmented_epochs  # the last clean_epochs see the plain images
    crop_pad = config.crop_pad if augment else 0
    plan = plan_epoch(
        state.train_images, state.generator, config.shuffle, crop_pad, config.flip and augment, d.rank, d.world_size
    )
    batches = Batches(train_x, train_y, plan, config.batch_size, crop_pad, start=state.step)
    sums = EpochSums.from_partial(state.partial, device)
    show = progress and d.main
    net.train()
    bar = tqdm(
        batches,
        total=state.steps_per_epoch,
        initial=state.step,
        desc=f"epoch {state.epoch + 1}/{config.epochs}",
        disable=not show,
        leave=False,
        dynamic_ncols=True,
    )
    t0 = time.perf_counter()
    for x, y in bar:
        where = f"epoch {state.epoch + 1}, batch {state.step + 1}"
        check = lambda loss, where=where: check_loss(loss, d, where)
        logits, loss = step(x, y, check) if step is not None else train_step(state, net, x, y, check=check)
        if state.scheduler is not None:
            state.scheduler.step()
        if state.ema is not None:
            state.ema.update(state.model)
        sums.loss_sum += loss.detach().double() * y.shape[0]
        sums.correct += (logits.detach().argmax(1) == y).sum()
        sums.seen += y.shape[0]
        state.step += 1
        if show and (state.step % 10 == 0 or state.step == state.steps_per_epoch):
            bar.set_postfix(
                loss=f"{sums.loss_sum.item() / sums.seen:.4f}", acc=f"{sums.correct.item() / sums.seen:.4f}"
            )
        if stop.check(d, device) and state.step < state.steps_per_epoch:
            sums.time += time.perf_counter() - t0
            state.partial = sums.to_partial()
            bar.close()
            return None
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the epoch's time includes its last kernels
    sums.time += time.perf_counter() - t0
    return sums


@torch.no_grad()
def evaluate_split(model, images, labels, batch_size: int = 2000) -> tuple[float, float, int]:
    """(mean cross-entropy, accuracy, number correct) on a whole split."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=images.device)
    correct = torch.zeros((), dtype=torch.long, device=images.device)
    for x, y in eval_batches(images, labels, batch_size):
        out = model(x)
        loss_sum += F.cross_entropy(out, y, reduction="sum").double()
        correct += (out.argmax(1) == y).sum()
    n = labels.shape[0]
    model.train()
    return loss_sum.item() / n, correct.item() / n, int(correct.item())


def epoch_record(
    state: RunState, sums: EpochSums, test_x: torch.Tensor, test_y: torch.Tensor, d: Dist, device: torch.device
) -> tuple[dict, float]:
    """The metrics line of the epoch just trained (the sums over all processes, and the test split),
    and the epoch's training time in seconds before the record rounds it."""
    seen = torch.tensor(float(sums.seen), dtype=torch.float64, device=device)
    stats = all_reduce_sum(torch.stack([sums.loss_sum, sums.correct.double(), seen]), d)
    total_seen = int(stats[2].item())
    times = all_reduce_sum(torch.tensor([sums.time], dtype=torch.float64, device=device), d)
    epoch_time = times.item() / d.world_size
    t1 = time.perf_counter()
    test_loss, test_acc, _ = evaluate_split(state.eval_model, test_x, test_y)
    record = {
        "epoch": state.epoch + 1,
        "train_loss": stats[0].item() / total_seen,
        "train_acc": stats[1].item() / total_seen,
        "train_correct": int(stats[1].item()),
        "test_loss": test_loss,
        "test_acc": test_acc,
        "eval_weights": state.eval_weights,
        "epoch_time_s": round(epoch_time, 3),
        "images_per_s": round(total_seen / epoch_time, 1) if epoch_time > 0 else None,
        "eval_time_s": round(time.perf_counter() - t1, 3),
        "lr": state.optimizer.param_groups[0]["lr"],
    }
    return record, epoch_time
