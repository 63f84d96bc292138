"""Train the seed CNN on Fashion-MNIST.

    python -m fmnist_ext.train                          # the seed recipe, fused kernels
    python -m fmnist_ext.train --recipe improved --out runs/improved
    python -m fmnist_ext.train --out runs/x --resume    # continue an interrupted run
    python -m fmnist_ext.train --sweep lr=0.01,0.001 batch_size=100,1000
    python -m torch.distributed.run --nproc_per_node=2 -m fmnist_ext.train ...

The run folder (--out) receives: checkpoint.pt (after every epoch and on
Ctrl-C), metrics.jsonl (one line per epoch), and at the end confusion.png,
curves.png, summary.json. All files are written atomically. Everything that
can be checked is checked before the data loads or a folder is made; the run
folder is locked for the run's life (runfolder.py).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import io
import itertools
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import atomic, checkpoint, cli, clirun, data, recipes
from .batches import Batches, batch_count, eval_batches, normalize, plan_epoch
from .ema import WeightEMA
from .evaluate import confusion_matrix, format_confusion, per_class_accuracy, predictions
from .model import KERNELS, FashionCNN
from .runfolder import RUN_FILES, RunFolder, RunFolderError, check_path

EXIT_INTERRUPTED = 130


# --------------------------------------------------------------------------- arguments


def _bool(text: str) -> bool:
    t = text.lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _choice(choices):
    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(choices)}, got {text!r}")
        return text

    return parse


SWEEP_TYPES = {
    "lr": cli.positive_float,
    "batch_size": cli.batch_size,
    "epochs": cli.positive_int,
    "seed": cli.seed,
    "kernels": _choice(KERNELS),
    "recipe": _choice(tuple(recipes.RECIPES)),
    "optimizer": _choice(recipes.OPTIMIZERS),
    "weight_decay": cli.nonneg_float,
    "schedule": _choice(recipes.SCHEDULES),
    "label_smoothing": cli.fraction,
    "crop_pad": cli.nonneg_int,
    "flip": _bool,
    "shuffle": _bool,
    "ema": cli.fraction,
    "clean_epochs": cli.nonneg_int,
}


def parse_sweep(items: list[str]) -> list[tuple[str, list]]:
    """['lr=0.01,0.001', 'batch_size=100,1000'] -> [('lr', [0.01, 0.001]), ...]"""
    out, seen = [], set()
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not values:
            raise argparse.ArgumentTypeError(f"expected KEY=V1,V2,..., got {item!r}")
        if key not in SWEEP_TYPES:
            raise argparse.ArgumentTypeError(f"unknown key {key!r} (one of {', '.join(SWEEP_TYPES)})")
        if key in seen:
            raise argparse.ArgumentTypeError(f"key {key!r} given twice")
        seen.add(key)
        try:
            parsed = [SWEEP_TYPES[key](v.strip()) for v in values.split(",")]
        except (argparse.ArgumentTypeError, ValueError) as e:
            raise argparse.ArgumentTypeError(f"{key}: {e}") from None
        out.append((key, parsed))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = cli.OneLineErrorParser(
        prog=cli.prog("fmnist_ext.train"),
        description="Train the seed CNN on Fashion-MNIST (fused or stock conv blocks). "
        "Options left unset come from the --recipe.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="recipes:\n"
        + "\n".join(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in r.items()) for name, r in recipes.RECIPES.items())
        + "\n\nUnder torchrun (RANK and WORLD_SIZE set) the loop runs with DistributedDataParallel "
        "(gloo on CPU, nccl on CUDA); only rank 0 writes files. A --resume needs the number of processes "
        "the checkpoint was written with.\n\nBatches: when the last batch of an epoch (of each process) would "
        "hold a single image, that image joins the previous batch (BatchNorm cannot train on one image; no "
        "image is dropped).\n\nThe run folder is locked while a run uses it: a second run on it is refused. "
        "Exit status: 0 done, 2 a usage error (one line), 1 a file could not be written (the previous "
        "version is kept), 130 interrupted.",
    )
    p.add_argument("--recipe", choices=tuple(recipes.RECIPES), default=None, help="hyperparameter set (default: seed)")
    p.add_argument(
        "--kernels",
        choices=KERNELS,
        default=None,
        help="conv blocks: the fused operator or stock PyTorch layers (default: fused)",
    )
    p.add_argument(
        "--seed",
        type=cli.seed,
        default=None,
        help="seed for weights, shuffling and augmentation, in [-2**63, 2**64) (default: 0)",
    )
    p.add_argument("--device", choices=cli.DEVICES, default="auto", help="auto: CUDA when present (default: auto)")
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="run folder (default: runs/RECIPE-KERNELS-sSEED; with --sweep, one subfolder per run)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from OUT/checkpoint.pt with the settings saved there"
    )
    g = p.add_argument_group("recipe overrides")
    g.add_argument("--epochs", type=cli.positive_int, default=None, help="number of epochs (seed: 20)")
    g.add_argument(
        "--lr", type=cli.positive_float, default=None, help="learning rate; peak rate with onecycle (seed: 0.01)"
    )
    g.add_argument(
        "--batch-size",
        type=cli.batch_size,
        default=None,
        help="batch size, at least 2; a last batch of one image joins the one before (seed: 1000)",
    )
    g.add_argument("--optimizer", choices=recipes.OPTIMIZERS, default=None, help="optimizer (seed: adam)")
    g.add_argument("--weight-decay", type=cli.nonneg_float, default=None, help="weight decay (seed: 0)")
    g.add_argument(
        "--schedule",
        choices=recipes.SCHEDULES,
        default=None,
        help="learning-rate schedule, stepped per batch (seed: none)",
    )
    g.add_argument("--label-smoothing", type=cli.fraction, default=None, help="label smoothing in [0, 1) (seed: 0)")
    g.add_argument(
        "--crop-pad",
        type=cli.nonneg_int,
        default=None,
        help="random-crop augmentation with this zero padding, 0 = off (seed: 0)",
    )
    cli.flag_pair(g, "flip", "random horizontal flips", "no flips (seed)")
    cli.flag_pair(
        g,
        "shuffle",
        "shuffle each epoch from the seeded generator (seed recipe: on)",
        "keep the file order every epoch",
    )
    g.add_argument(
        "--clean-epochs",
        type=cli.nonneg_int,
        default=None,
        metavar="N",
        help="train the last N epochs on the plain images: no crops, no flips (seed: 0)",
    )
    g.add_argument(
        "--ema",
        type=cli.fraction,
        default=None,
        metavar="DECAY",
        help="evaluate and save an exponential moving average of the weights and BatchNorm "
        "statistics, updated every batch with this decay (warm-up min(DECAY, (1+t)/(10+t))); "
        "0 = off, evaluate the raw weights (seed: 0)",
    )
    p.add_argument(
        "--sweep",
        nargs="+",
        default=None,
        metavar="KEY=V1,V2",
        help="train the cartesian product of these settings (keys: "
        + ", ".join(SWEEP_TYPES)
        + "); prints a markdown table sorted by test accuracy and writes OUT/sweep.csv",
    )
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="torch.use_deterministic_algorithms(True) (warn only) and no cuDNN benchmarking",
    )
    p.add_argument(
        "--tensorboard",
        action="store_true",
        help="also log to OUT/tensorboard (needs the optional tensorboard package)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    cli.add_data_args(p)
    return p


# --------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(parser, device_name: str) -> tuple[Dist, torch.device]:
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Dist(), cli.resolve_device(parser, device_name)
    d = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    device = cli.resolve_device(parser, device_name, d.local_rank)
    if d.enabled:
        import torch.distributed as dist

        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return d, device


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(d: Dist) -> None:
    if d.enabled:
        import torch.distributed as dist

        dist.barrier()


# --------------------------------------------------------------------------- Ctrl-C


class StopRequest:
    """First Ctrl-C: finish the batch, save a checkpoint, exit. Second: abort now."""

    def __init__(self, quiet: bool):
        self.requested = False
        self.quiet = quiet
        self._old = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if not self.quiet:
            print(
                "\nInterrupted: finishing this batch and saving a checkpoint (Ctrl-C again to abort without saving)",
                file=sys.stderr,
                flush=True,
            )

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)

    def check(self, d: Dist, device) -> bool:
        """Whether any rank was asked to stop (a collective under DDP)."""
        if not d.enabled:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        return bool(all_reduce_sum(flag, d).item() > 0)


class Interrupted(Exception):
    """Stopped on request after saving `out`/checkpoint.pt."""

    def __init__(self, where: str, out: Path):
        super().__init__(where)
        self.out = out


# --------------------------------------------------------------------------- one run


def resolve_config(args) -> dict:
    recipe = args.recipe or "seed"
    config = {"recipe": recipe, "seed": 0 if args.seed is None else args.seed, "kernels": args.kernels or "fused"}
    config.update(recipes.RECIPES[recipe])
    for key in recipes.TRAINING_KEYS:
        v = getattr(args, key)
        if v is not None:
            config[key] = v
    return config


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


def train_run(
    config: dict,
    out: Path,
    ds: data.FashionMNIST,
    device: torch.device,
    d: Dist,
    resume: dict | None = None,
    progress: bool = True,
    tensorboard: bool = False,
) -> dict:
    """Train one run; return its summary. Raises Interrupted after saving on Ctrl-C."""
    from tqdm import tqdm

    main = d.main
    torch.manual_seed(config["seed"])
    gen = torch.Generator().manual_seed(config["seed"])
    model = FashionCNN(config["kernels"]).to(device)
    train_x, train_y = ds.train.images.to(device), ds.train.labels.to(device)
    test_x, test_y = ds.test.images.to(device), ds.test.labels.to(device)
    n_train = len(ds.train)
    per_rank = n_train // d.world_size if d.enabled else n_train
    steps_per_epoch = batch_count(per_rank, config["batch_size"])
    optimizer = recipes.make_optimizer(config["optimizer"], model.parameters(), config["lr"], config["weight_decay"])
    scheduler = recipes.make_scheduler(config["schedule"], optimizer, config["lr"], config["epochs"], steps_per_epoch)
    criterion = recipes.make_criterion(config["label_smoothing"])
    ema_decay = config.get("ema", 0.0)  # checkpoints from before --ema have no such key
    ema = WeightEMA(model, ema_decay) if ema_decay > 0 else None
    eval_model = ema.module if ema is not None else model
    eval_weights = "ema" if ema is not None else "raw"

    epoch, step, history = 0, 0, []
    partial = {"loss_sum": 0.0, "correct": 0, "seen": 0, "time": 0.0}
    if resume is not None:
        try:
            if resume["step"] >= steps_per_epoch:
                raise ValueError(f"step {resume['step']} is past the {steps_per_epoch} batches of an epoch")
            model.load_state_dict(resume["model"])
            optimizer.load_state_dict(resume["optimizer"])
            if (scheduler is None) != (resume["scheduler"] is None):
                raise ValueError("the learning-rate schedule state does not match the settings")
            if scheduler is not None:
                scheduler.load_state_dict(resume["scheduler"])
            if ema is not None:
                ema.load_state_dict(resume["ema"])
            checkpoint.set_rng_state(resume["rng"], gen)
        except (KeyError, ValueError, RuntimeError, TypeError, IndexError) as e:
            # load() checked the structure; this is what only building the run can find
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise checkpoint.CheckpointError(f"{out / 'checkpoint.pt'}: cannot resume from it ({first})") from None
        epoch, step, history = resume["epoch"], resume["step"], list(resume["history"])
        partial = dict(resume["partial"])
        if main:
            if epoch >= config["epochs"]:
                print(
                    f"{out / 'checkpoint.pt'}: the run is already finished ({epoch} epochs); "
                    "recomputing its final results"
                )
            else:
                where = f"epoch {epoch + 1}, batch {step + 1}" if step else f"epoch {epoch + 1}"
                print(f"resuming {out / 'checkpoint.pt'} at {where} of {config['epochs']}")
    # The generator state at the start of the epoch in progress (restored above on resume).
    epoch_start_state = gen.get_state()

    net = model
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    tb = None
    if tensorboard and main:
        from .tblog import TBLogger

        tb = TBLogger(str(out / "tensorboard"))
        tb.start(model, ds.train.images[:64], normalize(train_x[:64]))

    def state(ep: int, st: int, part: dict) -> dict:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "ema": ema.state_dict() if ema is not None else None,
            "epoch": ep,
            "step": st,
            "rng": {**checkpoint.rng_state(gen), "data": epoch_start_state},
            "partial": part,
            "history": history,
            "config": config,
            "kernels": config["kernels"],
            # the batches of an epoch depend on these: a resume needs the same
            "world_size": d.world_size,
            "train_images": n_train,
        }

    def write_metrics() -> None:
        atomic.write_text(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))

    with StopRequest(quiet=not main) as stop:
        while epoch < config["epochs"]:
            gen.set_state(epoch_start_state)
            # the last clean_epochs epochs see the plain images (key absent in checkpoints from before it)
            augment = epoch < config["epochs"] - config.get("clean_epochs", 0)
            crop_pad = config["crop_pad"] if augment else 0
            plan = plan_epoch(
                n_train, gen, config["shuffle"], crop_pad, config["flip"] and augment, d.rank, d.world_size
            )
            batches = Batches(train_x, train_y, plan, config["batch_size"], crop_pad, start=step)
            loss_sum = torch.tensor(partial["loss_sum"], dtype=torch.float64, device=device)
            correct = torch.tensor(partial["correct"], dtype=torch.long, device=device)
            seen, elapsed = partial["seen"], partial["time"]
            net.train()
            bar = tqdm(
                batches,
                total=steps_per_epoch,
                initial=step,
                desc=f"epoch {epoch + 1}/{config['epochs']}",
                disable=not (progress and main),
                leave=False,
                dynamic_ncols=True,
            )
            t0 = time.perf_counter()
            for x, y in bar:
                optimizer.zero_grad(set_to_none=True)
                logits = net(x)
                loss = criterion(logits, y)
                loss.backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                if ema is not None:
                    ema.update(model)
                loss_sum += loss.detach().double() * y.shape[0]
                correct += (logits.detach().argmax(1) == y).sum()
                seen += y.shape[0]
                step += 1
                if progress and main and (step % 10 == 0 or step == steps_per_epoch):
                    bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.4f}")
                if stop.check(d, device) and step < steps_per_epoch:
                    elapsed += time.perf_counter() - t0
                    part = {"loss_sum": loss_sum.item(), "correct": int(correct.item()), "seen": seen, "time": elapsed}
                    if main:
                        checkpoint.save(out / "checkpoint.pt", state(epoch, step, part))
                    bar.close()
                    raise Interrupted(f"epoch {epoch + 1}, after batch {step}", out)
            bar.close()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed += time.perf_counter() - t0
            stats = all_reduce_sum(
                torch.stack(
                    [loss_sum, correct.double(), torch.tensor(float(seen), dtype=torch.float64, device=device)]
                ),
                d,
            )
            total_seen = int(stats[2].item())
            times = all_reduce_sum(torch.tensor([elapsed], dtype=torch.float64, device=device), d)
            epoch_time = times.item() / d.world_size
            t1 = time.perf_counter()
            test_loss, test_acc, _ = evaluate_split(eval_model, test_x, test_y)
            record = {
                "epoch": epoch + 1,
                "train_loss": stats[0].item() / total_seen,
                "train_acc": stats[1].item() / total_seen,
                "train_correct": int(stats[1].item()),
                "test_loss": test_loss,
                "test_acc": test_acc,
                "eval_weights": eval_weights,
                "epoch_time_s": round(epoch_time, 3),
                "images_per_s": round(total_seen / epoch_time, 1) if epoch_time > 0 else None,
                "eval_time_s": round(time.perf_counter() - t1, 3),
                "lr": optimizer.param_groups[0]["lr"],
            }
            history.append(record)
            epoch, step = epoch + 1, 0
            partial = {"loss_sum": 0.0, "correct": 0, "seen": 0, "time": 0.0}
            epoch_start_state = gen.get_state()
            if main:
                checkpoint.save(out / "checkpoint.pt", state(epoch, 0, partial))
                write_metrics()
                if tb is not None:
                    tb.epoch(epoch, record, model)
                print(
                    f"epoch {epoch:>3}/{config['epochs']}  train loss {record['train_loss']:.4f}  "
                    f"train acc {record['train_acc']:.4f}  test acc{' (EMA)' if ema is not None else ''} {test_acc:.4f}  "
                    f"{epoch_time:.1f} s  {record['images_per_s']:.0f} img/s",
                    flush=True,
                )
            if stop.check(d, device) and epoch < config["epochs"]:
                raise Interrupted(f"after epoch {epoch}", out)
    if tb is not None:
        tb.close()
    return finish(config, out, eval_model, ds, test_x, history, main, eval_weights)


def finish(config, out: Path, model, ds, test_x, history, main: bool, eval_weights: str = "raw") -> dict:
    """Confusion matrix (printed and PNG), curves PNG, summary JSON; `model` is
    the one evaluated (the EMA copy when eval_weights is "ema")."""
    cm = confusion_matrix(predictions(model, test_x), ds.test.labels)
    acc = cm.diag().sum().item() / cm.sum().item()
    summary = {
        "config": config,
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
        from . import viz

        print(
            f"test accuracy {acc:.4f} ({'EMA' if eval_weights == 'ema' else 'raw'} weights); confusion matrix (rows: true, columns: predicted):"
        )
        print(format_confusion(cm))
        viz.save_confusion(
            cm,
            out / "confusion.png",
            title=f"Test set, {config['recipe']} recipe, {config['kernels']} kernels: accuracy {acc:.4f}",
        )
        viz.save_curves(history, out / "curves.png")
        atomic.write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        print(f"wrote {out}/{{checkpoint.pt,metrics.jsonl,confusion.png,curves.png,summary.json}}")
    return summary


def _kernels_status() -> dict:
    from .op import kernels_status

    s = kernels_status()
    return {k: s[k] for k in ("cpu", "cuda", "cpu_isa")}


# --------------------------------------------------------------------------- main


def _explicit_overrides(args) -> dict:
    keys = ("recipe", "seed", "kernels", *recipes.TRAINING_KEYS)
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


class UsageError(Exception):
    """A mistake in the command line or the run folder: `python -m ... error: <argument>: <message>`, exit 2."""

    def __init__(self, argument: str, message: str):
        super().__init__(f"argument {argument}: {message}")


@dataclass
class SweepRun:
    name: str
    values: tuple
    config: dict
    out: Path


def plan_sweep(args, grid, base_out: Path) -> list[SweepRun]:
    """Every run of the sweep, checked before any of them trains: no setting
    given twice, no two runs sharing a folder, every folder name usable."""
    keys = [k for k, _ in grid]
    both = [k for k in keys if getattr(args, k, None) is not None]
    if both:
        raise UsageError(
            "--sweep",
            f"{', '.join(both)} also given as "
            f"{', '.join('--' + k.replace('_', '-') for k in both)}; give each setting once",
        )
    runs: list[SweepRun] = []
    for values in itertools.product(*(v for _, v in grid)):
        ns = argparse.Namespace(**vars(args))
        for k, v in zip(keys, values):
            setattr(ns, k, v)
        config = resolve_config(ns)
        name = "_".join(f"{k}={v}" for k, v in zip(keys, values)).replace("/", "-")
        if len(name.encode()) > 255:
            raise UsageError("--sweep", f"run folder name {name[:60]}... is longer than 255 bytes; sweep fewer keys")
        for other in runs:
            if other.config == config or other.name == name:
                what = f"run {name} comes twice" if other.name == name else f"runs {other.name} and {name} are the same"
                raise UsageError(
                    "--sweep",
                    f"{what}: the same setting (a value given twice, e.g. 0.01 and 0.010); give each value once",
                )
        runs.append(SweepRun(name, values, config, base_out / name))
    return runs


def run_sweep(runs: list[SweepRun], keys: list[str], base_out: Path, d, device, ds, progress: bool) -> int:
    results = []
    for r in runs:
        if d.main:
            print(f"== run {len(results) + 1}/{len(runs)}: {r.name}")
        s = train_run(r.config, r.out, ds, device, d, progress=progress)
        results.append(
            {
                **dict(zip(keys, r.values)),
                "test_acc": s["test_acc"],
                "train_acc": s["final"]["train_acc"],
                "train_loss": s["final"]["train_loss"],
                "epoch_time_s": round(s["mean_epoch_time_s"], 2),
                "run": str(r.out),
            }
        )
    results.sort(key=lambda r: r["test_acc"], reverse=True)
    if d.main:
        cols = list(results[0])
        print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
        for r in results:
            print(
                "| "
                + " | ".join(
                    f"{r[c]:.4f}" if isinstance(r[c], float) and c.endswith(("acc", "loss")) else str(r[c])
                    for c in cols
                )
                + " |"
            )
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols)
        w.writeheader()
        w.writerows(results)
        atomic.write_text(base_out / "sweep.csv", buf.getvalue())
        print(f"\nwrote {base_out / 'sweep.csv'}")
    return 0


def _dist_from_env() -> Dist:
    """Rank and world size as torchrun sets them, known before the process group starts."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Dist()
    try:
        return Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise UsageError("RANK/WORLD_SIZE", "the torchrun environment variables are not integers") from None


def _check_args(args) -> list | None:
    """Everything about the command line alone; returns the sweep grid (or None)."""
    grid = None
    if args.sweep is not None:
        try:
            grid = parse_sweep(args.sweep)
        except argparse.ArgumentTypeError as e:
            raise UsageError("--sweep", str(e)) from None
        if args.resume:
            raise UsageError("--resume", "not allowed with --sweep")
        if args.tensorboard:
            raise UsageError("--tensorboard", "not supported with --sweep")
    if args.tensorboard:
        try:
            importlib.import_module("torch.utils.tensorboard")
        except ImportError as e:
            raise UsageError(
                "--tensorboard", f"needs the tensorboard package ({e}); install it with: pip install tensorboard"
            ) from None
    return grid


def _load_resume(args, out: Path, world_size: int) -> dict:
    """The checkpoint to continue, checked against the command line and the process count."""
    ckpt_path = out / "checkpoint.pt"
    try:
        resume = checkpoint.load(ckpt_path, map_location="cpu", resume=True)
    except checkpoint.CheckpointError as e:
        raise UsageError("--resume", str(e)) from None
    saved = resume["config"]
    conflicts = [
        f"--{k.replace('_', '-')} {v} (checkpoint: {saved.get(k)})"
        for k, v in _explicit_overrides(args).items()
        if saved.get(k) != v
    ]
    if conflicts:
        raise UsageError(
            "--resume", "the run's settings come from the checkpoint; these differ: " + ", ".join(conflicts)
        )
    if resume["world_size"] != world_size:
        n = resume["world_size"]
        how = "without torchrun" if n == 1 else f"under torchrun --nproc_per_node={n}"
        raise UsageError(
            "--resume",
            f"{ckpt_path} was written by {n} training process(es), this run has "
            f"{world_size}; the batches of an epoch depend on it: resume {how}",
        )
    return resume


def _check_data(ds, d: Dist, resume: dict | None, out: Path) -> None:
    n = len(ds.train)
    if n // d.world_size < 2:
        raise UsageError(
            "--data-dir",
            f"the training split has {n} image(s): at least 2 per process "
            f"({d.world_size}) are needed (BatchNorm cannot train on one image)",
        )
    # checkpoints from before the field: unknown, not checked
    if resume is not None and resume.get("train_images", n) != n:
        raise UsageError(
            "--resume",
            f"{out / 'checkpoint.pt'} was trained on {resume['train_images']} training "
            f"images, these data have {n}; resume it with the same data",
        )


@clirun.guarded("fmnist_ext.train")  # `train ... | head`: a closed stdout pipe exits 141 quietly
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with contextlib.ExitStack() as folders:
            return _main(parser, args, folders)
    except UsageError as e:
        cli.fail(parser, str(e))
    except atomic.WriteError as e:  # a full disk, a folder made read-only during the run
        cli.fail(parser, str(e), status=1)
    except KeyboardInterrupt:  # before training started (checks, data loading): nothing was written
        print("\ninterrupted before training started; nothing was trained or saved", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


def _main(parser, args, folders: contextlib.ExitStack) -> int:
    """main's work; raises UsageError for anything the user can fix. `folders`
    holds the run folder locks until the process is done."""
    grid = _check_args(args)
    config = resolve_config(args)
    sweep = grid is not None
    if sweep:
        out = Path(args.out or f"runs/sweep-{args.recipe or 'seed'}")
    else:
        out = Path(args.out or f"runs/{config['recipe']}-{config['kernels']}-s{config['seed']}")
    runs = plan_sweep(args, grid, out) if sweep else []
    for path in [out, *(r.out for r in runs)]:
        try:
            check_path(path)
        except RunFolderError as e:
            raise UsageError("--out", str(e)) from None
    d0 = _dist_from_env()
    if args.resume and not (out / "checkpoint.pt").is_file():
        raise UsageError("--resume", f"{out / 'checkpoint.pt'}: no such checkpoint file")

    if d0.main:  # only rank 0 writes, so only it owns the folders
        try:
            folders.enter_context(RunFolder(out, create=not args.resume))
            for r in runs:
                folders.enter_context(RunFolder(r.out))
        except RunFolderError as e:
            raise UsageError("--out", str(e)) from None
        # nothing of the user's is overwritten (a sweep writes only sweep.csv beside its run folders)
        for path in [] if args.resume else [r.out for r in runs] if sweep else [out]:
            present = [name for name in RUN_FILES if (path / name).exists()]
            if present:
                hint = "add --resume to continue it or " if "checkpoint.pt" in present and not sweep else ""
                raise UsageError(
                    "--out", f"{path} already holds a run ({', '.join(present)}); {hint}choose another --out"
                )
        if sweep and (out / "sweep.csv").exists():
            raise UsageError("--out", f"{out / 'sweep.csv'} exists (an earlier sweep); choose another --out")
    resume = _load_resume(args, out, d0.world_size) if args.resume else None
    if resume is not None:
        config = resume["config"]
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False

    d, device = init_distributed(parser, args.device)
    from .selfcheck import precheck_training  # fused kernels usable here? else exit 2 (issue 8 §3)

    precheck_training(parser, config["kernels"], device)
    try:
        if d.main:
            ds = data.load(
                args.data_dir, verify=not args.no_verify, download=not args.no_download, progress=not args.no_progress
            )
        barrier(d)  # rank 0 downloads (if needed) before the others look
        if not d.main:
            ds = data.load(args.data_dir, verify=not args.no_verify, download=False, progress=False)
    except data.DataError as e:
        cli.fail(parser, str(e))
    _check_data(ds, d, resume, out)
    if d.main:
        print(
            f"{ds.describe()} ({len(ds.train)} train, {len(ds.test)} test); device {device}"
            + (f" x {d.world_size} processes" if d.enabled else "")
            + f"; kernels {config['kernels']}",
            flush=True,
        )
    try:
        if sweep:
            return run_sweep(runs, [k for k, _ in grid], out, d, device, ds, progress=not args.no_progress)
        train_run(config, out, ds, device, d, resume, progress=not args.no_progress, tensorboard=args.tensorboard)
        return 0
    except checkpoint.CheckpointError as e:
        raise UsageError("--resume", str(e)) from None
    except Interrupted as e:
        if d.main:
            cmd = f"python -m fmnist_ext.train --out {e.out} --resume"
            print(
                f"\nstopped {e}; checkpoint saved to {e.out / 'checkpoint.pt'}.\n"
                + (
                    f"The sweep stops here and {out / 'sweep.csv'} is not written; finish this run with: {cmd}"
                    if sweep
                    else f"resume with: {cmd}"
                ),
                file=sys.stderr,
                flush=True,
            )
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        if d.main:
            print(
                f"\naborted; the last checkpoint in {out} (if any) is intact"
                + ("" if sweep else "; resume with --resume"),
                file=sys.stderr,
                flush=True,
            )
        return EXIT_INTERRUPTED
    finally:
        if d.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
