"""Pictures: the dataset sprite, confusion matrices, training curves.

    python -m fmnist_ext.viz sprite [--out sprite.png]
    python -m fmnist_ext.viz curves RUN_DIR [--out curves.png]

All files are written atomically, in the format of their extension (checked,
with the folder, before any work). matplotlib runs with the Agg backend.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from . import atomic, cli, data, paths


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sprite_array(
    images: torch.Tensor, labels: torch.Tensor, rows_per_class: int = 3, columns: int = 10
) -> torch.Tensor:
    """uint8 (10*rows*28, columns*28): each class on `rows_per_class` rows, the
    first images of that class in dataset order."""
    n = rows_per_class * columns
    tiles = []
    for c in range(len(data.CLASSES)):
        idx = torch.nonzero(labels == c).flatten()[:n]
        if idx.numel() < n:
            raise ValueError(f"class {c} ({data.CLASSES[c]}) has {idx.numel()} images, the sprite needs {n}")
        t = images[idx].reshape(rows_per_class, columns, 28, 28).permute(0, 2, 1, 3)
        tiles.append(t.reshape(rows_per_class * 28, columns * 28))
    return torch.cat(tiles, 0)


def save_sprite(images, labels, path, rows_per_class: int = 3, columns: int = 10) -> None:
    arr = sprite_array(images, labels, rows_per_class, columns).numpy()
    plt = _plt()
    h, w = arr.shape
    fig = plt.figure(figsize=(w / 50 + 1.6, h / 50), dpi=100)
    ax = fig.add_axes([0.16, 0, 0.84, 1])
    ax.imshow(arr, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([(c * rows_per_class + rows_per_class / 2) * 28 for c in range(len(data.CLASSES))])
    ax.set_yticklabels(data.CLASSES)
    atomic.save_figure(fig, path)
    plt.close(fig)


def save_confusion(cm: torch.Tensor, path, title: str = "Confusion matrix (test set)") -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 7))
    m = cm.numpy()
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(10))
    ax.set_yticks(range(10))
    ax.set_xticklabels(data.CLASSES, rotation=45, ha="right")
    ax.set_yticklabels(data.CLASSES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    thresh = m.max() / 2 if m.size else 0
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(
                j, i, str(m[i, j]), ha="center", va="center", fontsize=7, color="white" if m[i, j] > thresh else "black"
            )
    fig.tight_layout()
    atomic.save_figure(fig, path)
    plt.close(fig)


def save_curves(history: list[dict], path) -> None:
    """Loss and accuracy per epoch (train and test)."""
    plt = _plt()
    ep = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    a1.plot(ep, [h["test_loss"] for h in history], "o-", label="test")
    a1.set_xlabel("epoch")
    a1.set_ylabel("cross-entropy loss")
    a1.legend()
    a2.plot(ep, [h["train_acc"] for h in history], "o-", label="train")
    a2.plot(ep, [h["test_acc"] for h in history], "o-", label="test")
    a2.set_xlabel("epoch")
    a2.set_ylabel("accuracy")
    a2.legend()
    fig.tight_layout()
    atomic.save_figure(fig, path)
    plt.close(fig)


CURVE_KEYS = ("epoch", "train_loss", "test_loss", "train_acc", "test_acc")


class MetricsError(Exception):
    """A metrics.jsonl that cannot be drawn (the message names the file and the line)."""


def read_metrics(path: Path) -> list[dict]:
    """The per-epoch records of a run's metrics.jsonl, each checked to hold the numbers the curves need."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MetricsError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    records = []
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise MetricsError(f"{path}: line {no}: not JSON ({e.msg}; cut off by a crash?)") from None
        if not isinstance(rec, dict):
            raise MetricsError(f"{path}: line {no}: expected a JSON object, got {type(rec).__name__}")
        bad = [k for k in CURVE_KEYS if isinstance(rec.get(k), bool) or not isinstance(rec.get(k), (int, float))]
        if bad:
            raise MetricsError(f"{path}: line {no}: missing or not a number: {', '.join(bad)}")
        records.append(rec)
    if not records:
        raise MetricsError(f"{path}: no epochs recorded yet")
    return records


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    p = argparse.ArgumentParser(prog=cli.prog("fmnist_ext.viz"), description="Fashion-MNIST pictures.")
    sub = p.add_subparsers(dest="command", required=True)
    sprite_cmd = sub.add_parser("sprite", help="the training-set sprite: each class on three rows")
    sprite_cmd.add_argument(
        "--out",
        default="sprite.png",
        help="image to write; the format follows the extension (png, pdf, svg, ...; default: sprite.png)",
    )
    sprite_cmd.add_argument("--rows", type=cli.positive_int, default=3, help="rows per class (default: 3)")
    sprite_cmd.add_argument("--columns", type=cli.positive_int, default=10, help="images per row (default: 10)")
    cli.add_data_args(sprite_cmd)
    curves_cmd = sub.add_parser("curves", help="training curves of a run folder (from its metrics.jsonl)")
    curves_cmd.add_argument("run_dir", help="run folder written by fmnist_ext.train")
    curves_cmd.add_argument(
        "--out", default=None, help="image to write; the format follows the extension (default: RUN_DIR/curves.png)"
    )
    return p, {"sprite": sprite_cmd, "curves": curves_cmd}


def _check_out(sub: argparse.ArgumentParser, out) -> None:
    """Before any work: --out must be a writable file name with an extension matplotlib can write."""
    try:
        cli.check_figure_format(out, "--out")
        cli.check_writable(out, "--out")
    except cli.OutputError as e:
        cli.fail(sub, str(e))


def _save(sub: argparse.ArgumentParser, save, *args) -> None:
    try:
        save(*args)
    except OSError as e:  # the folder vanished or filled up since the check
        cli.fail(sub, f"argument --out: cannot write {args[-1]}: {e.strerror or e}")


@cli.guarded("fmnist_ext.viz")
def main(argv=None) -> int:
    p, subs = build_parser()
    args = p.parse_args(argv)
    if args.command == "sprite":
        sprite_cmd = subs["sprite"]
        _check_out(sprite_cmd, args.out)
        try:
            ds = data.load(args.data_dir, verify=not args.no_verify, download=not args.no_download, splits=("train",))
        except data.DataError as e:
            cli.fail(sprite_cmd, str(e))
        cli.print_err(ds.describe())
        try:
            sprite_array(ds.train.images, ds.train.labels, args.rows, args.columns)
        except ValueError as e:
            cli.fail(sprite_cmd, f"argument --rows/--columns: {e}")
        _save(sprite_cmd, save_sprite, ds.train.images, ds.train.labels, args.out, args.rows, args.columns)
        print(f"wrote {args.out}")
    else:
        curves_cmd = subs["curves"]
        metrics = Path(args.run_dir) / "metrics.jsonl"
        try:
            found = paths.kind(metrics) == paths.FILE
        except paths.PathError as e:
            cli.fail(curves_cmd, f"argument run_dir: {e}")
        if not found:
            cli.fail(curves_cmd, f"argument run_dir: {metrics} does not exist")
        out = args.out or str(Path(args.run_dir) / "curves.png")
        _check_out(curves_cmd, out)
        try:
            history = read_metrics(metrics)
        except MetricsError as e:
            cli.fail(curves_cmd, f"argument run_dir: {e}")
        _save(curves_cmd, save_curves, history, out)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
