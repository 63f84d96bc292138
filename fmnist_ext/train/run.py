"""One training run, top to bottom: build (or resume) the state, train epoch
after epoch (checkpoint and metrics after each), then the final results.

Only rank 0 (`d.main`) prints and writes; every process trains. The files a
run writes into its folder: checkpoint.pt (after every epoch, and mid-epoch
on Ctrl-C), metrics.jsonl (one line per epoch), and at the end confusion.png,
curves.png, summary.json, all atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import atomic, data
from ..data.batches import normalize
from ..evaluate import confusion_matrix, format_confusion, per_class_accuracy, predictions
from .config import RunConfig
from .distributed import Dist
from .divergence import check_epoch
from .epoch import epoch_record, train_epoch
from .interrupt import Interrupted, StopRequest
from .state import RunState
from .step import GraphedStep


def train_run(
    config: RunConfig,
    out: Path,
    ds: data.FashionMNIST,
    device: torch.device,
    d: Dist,
    resume: dict | None = None,
    progress: bool = True,
    tensorboard: bool = False,
    cuda_graphs: bool = False,
) -> dict:
    """Train one run; return its summary. Raises Interrupted after saving on Ctrl-C, and
    Diverged (nothing saved since the last finite epoch) when a number stops being finite.
    cuda_graphs: replay the training step from a CUDA graph (step.py; the
    caller checked step.graph_refusal)."""
    ckpt_path = out / "checkpoint.pt"
    train_x, train_y = ds.train.images.to(device), ds.train.labels.to(device)
    test_x, test_y = ds.test.images.to(device), ds.test.labels.to(device)
    state = RunState.build(config, device, len(ds.train), d.world_size)
    if resume is not None:
        state.restore(resume, ckpt_path)
        if d.main:
            _say_where_it_resumes(state, ckpt_path)

    net = state.model
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(state.model, device_ids=[device.index] if device.type == "cuda" else None)

    tb = None
    if tensorboard and d.main:
        from .tblog import TBLogger

        tb = TBLogger(str(out / "tensorboard"))
        tb.start(state.model, ds.train.images[:64], normalize(train_x[:64]))

    step = GraphedStep(state, net, config.batch_size) if cuda_graphs else None
    with StopRequest(quiet=not d.main) as stop:
        while state.epoch < config.epochs:
            sums = train_epoch(state, net, train_x, train_y, d, device, stop, progress, step)
            if sums is None:
                if d.main:
                    state.save(ckpt_path)
                raise Interrupted(f"epoch {state.epoch + 1}, after batch {state.step}", out, stop.exit_status)
            record, epoch_time = epoch_record(state, sums, test_x, test_y, d, device)
            check_epoch(state.model, record, f"end of epoch {state.epoch + 1}")  # before it is saved
            state.finish_epoch(record)
            if d.main:
                state.save(ckpt_path)
                atomic.write_text(
                    out / "metrics.jsonl", "".join(json.dumps(h, allow_nan=False) + "\n" for h in state.history)
                )
                if tb is not None:
                    tb.epoch(state.epoch, record, state.model)
                _print_epoch(state, record, epoch_time)
            if stop.check(d, device) and state.epoch < config.epochs:
                raise Interrupted(f"after epoch {state.epoch}", out, stop.exit_status)
    if tb is not None:
        tb.close()
    return finish(config, out, state.eval_model, ds, test_x, state.history, d.main, state.eval_weights)


def _say_where_it_resumes(state: RunState, ckpt_path: Path) -> None:
    epochs = state.config.epochs
    if state.epoch >= epochs:
        print(f"{ckpt_path}: the run is already finished ({state.epoch} epochs); recomputing its final results")
    else:
        where = f"epoch {state.epoch + 1}, batch {state.step + 1}" if state.step else f"epoch {state.epoch + 1}"
        print(f"resuming {ckpt_path} at {where} of {epochs}")


def _print_epoch(state: RunState, record: dict, epoch_time: float) -> None:
    ema = " (EMA)" if state.ema is not None else ""
    print(
        f"epoch {state.epoch:>3}/{state.config.epochs}  train loss {record['train_loss']:.4f}  "
        f"train acc {record['train_acc']:.4f}  test acc{ema} {record['test_acc']:.4f}  "
        f"{epoch_time:.1f} s  {record['images_per_s']:.0f} img/s",
        flush=True,
    )


def finish(config: RunConfig, out: Path, model, ds, test_x, history, main: bool, eval_weights: str = "raw") -> dict:
    """Confusion matrix (printed and PNG), curves PNG, summary JSON; `model` is
    the one evaluated (the EMA copy when eval_weights is "ema")."""
    cm = confusion_matrix(predictions(model, test_x), ds.test.labels)
    acc = cm.diag().sum().item() / cm.sum().item()
    summary = {
        "config": config.to_dict(),
        "test_acc": acc,
        "eval_weights": eval_weights,
        "final": history[-1] if history else None,
        "per_class_acc": dict(zip(data.CLASSES, per_class_accuracy(cm).tolist())),
        "confusion_matrix": cm.tolist(),
        "mean_epoch_time_s": sum(h["epoch_time_s"] for h in history) / len(history) if history else None,
        "kernels_status": _kernels_status(),
        "torch": torch.__version__,
    }
    if main:
        from .. import viz

        weights = "EMA" if eval_weights == "ema" else "raw"
        print(f"test accuracy {acc:.4f} ({weights} weights); confusion matrix (rows: true, columns: predicted):")
        print(format_confusion(cm))
        viz.save_confusion(
            cm,
            out / "confusion.png",
            title=f"Test set, {config.recipe} recipe, {config.kernels} kernels: accuracy {acc:.4f}",
        )
        viz.save_curves(history, out / "curves.png")
        atomic.write_text(out / "summary.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
        print(f"wrote {out}/{{checkpoint.pt,metrics.jsonl,confusion.png,curves.png,summary.json}}")
    return summary


def _kernels_status() -> dict:
    from ..op import kernels_status

    s = kernels_status()
    return {k: s[k] for k in ("cpu", "cuda", "cpu_isa")}
