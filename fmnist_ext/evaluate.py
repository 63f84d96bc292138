"""Evaluate a checkpoint on the Fashion-MNIST test set.

    python -m fmnist_ext.evaluate runs/baseline-fused-s0/checkpoint.pt

prints test accuracy, per-class accuracy and the confusion matrix. Only the
two test files (t10k-*) are needed; the data folder used is printed on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from . import checkpoint, cli, data
from .data.batches import eval_batches


@torch.no_grad()
def predictions(model, images_u8: torch.Tensor, batch_size: int = 2000) -> torch.Tensor:
    """Predicted classes for a whole split (uint8 images on the model's device)."""
    was_training = model.training
    model.eval()
    no_labels = torch.empty(images_u8.shape[0], dtype=torch.long)  # eval_batches wants some
    out = [model(x).argmax(1) for x, _ in eval_batches(images_u8, no_labels, batch_size)]
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=images_u8.device)


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int = 10) -> torch.Tensor:
    """cm[i, j] = number of images of true class i predicted as class j."""
    idx = target.long().cpu() * num_classes + pred.long().cpu()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(cm: torch.Tensor) -> torch.Tensor:
    return cm.diag().double() / cm.sum(1).clamp(min=1).double()


def format_confusion(cm: torch.Tensor, classes=data.CLASSES) -> str:
    """A text table: rows are true classes, columns predicted classes."""
    short = [c.split("/")[0][:7] for c in classes]
    width = max(6, len(str(int(cm.max()))) + 1)
    lines = ["true \\ predicted".ljust(14) + "".join(s.rjust(width + 2) for s in short)]
    for name, row in zip(classes, cm.tolist()):
        lines.append(name[:13].ljust(14) + "".join(str(v).rjust(width + 2) for v in row))
    return "\n".join(lines)


def format_report(cm: torch.Tensor, classes=data.CLASSES) -> str:
    acc = cm.diag().sum().item() / max(1, cm.sum().item())
    pc = per_class_accuracy(cm)
    lines = [f"test accuracy: {acc:.4f} ({cm.diag().sum().item()}/{cm.sum().item()})", "per-class accuracy:"]
    lines += [f"  {c:<12} {a:.4f}" for c, a in zip(classes, pc.tolist())]
    lines += ["confusion matrix:", format_confusion(cm, classes)]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=cli.prog("fmnist_ext.evaluate"),
        description="Test accuracy, per-class accuracy and confusion matrix of a checkpoint on the Fashion-MNIST test set.",
    )
    p.add_argument("checkpoint", help="checkpoint file written by fmnist_ext.train (e.g. RUN/checkpoint.pt)")
    cli.add_data_args(p)
    p.add_argument("--device", default="auto", choices=cli.DEVICES, help="auto: CUDA when present (default: auto)")
    p.add_argument(
        "--kernels",
        choices=("fused", "stock"),
        default=None,
        help="conv blocks to run (default: the ones the checkpoint was trained with)",
    )
    p.add_argument("--batch-size", type=cli.positive_int, default=2000, help="evaluation batch size (default: 2000)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object instead")
    return p


@cli.guarded("fmnist_ext.evaluate")
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.refuse_bad_cpu_isa(parser)
    device = cli.resolve_device(parser, args.device)
    try:
        model = checkpoint.load_model(args.checkpoint, args.kernels, device)
    except checkpoint.CheckpointError as e:
        cli.fail(parser, f"argument checkpoint: {e}")
    try:
        ds = data.load(args.data_dir, verify=not args.no_verify, download=not args.no_download, splits=("test",))
    except data.DataError as e:
        cli.fail(parser, str(e))
    cli.print_err(ds.describe())
    images, labels = ds.test.images.to(device), ds.test.labels
    # The inference form (BatchNorm folded, one C++ op on CPU) gives the eval
    # model's outputs faster; a stock model stays stock.
    infer = model.for_inference() if model.kernels == "fused" else model
    cm = confusion_matrix(predictions(infer, images, args.batch_size), labels)
    if args.json:
        acc = cm.diag().sum().item() / cm.sum().item()
        print(
            json.dumps(
                {
                    "test_accuracy": acc,
                    "per_class_accuracy": dict(zip(data.CLASSES, per_class_accuracy(cm).tolist())),
                    "confusion_matrix": cm.tolist(),
                    "data_folder": str(ds.folder),
                }
            )
        )
    else:
        print(format_report(cm))
    return 0


if __name__ == "__main__":
    sys.exit(main())
