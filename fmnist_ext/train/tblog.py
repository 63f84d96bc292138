"""Optional TensorBoard logging (what the seed logged): loss, number correct,
accuracy, weight and gradient histograms, an image grid, the graph.

tensorboard is an optional dependency: `pip install tensorboard`
(or `pip install fmnist-ext[tensorboard]`).
"""

from __future__ import annotations

import warnings

import torch


class TensorBoardMissing(Exception):
    pass


def image_grid(images_u8: torch.Tensor, columns: int = 8) -> torch.Tensor:
    """uint8 (N, 28, 28) -> (1, rows*28, columns*28), padded with black tiles."""
    n = images_u8.shape[0]
    rows = -(-n // columns)
    pad = rows * columns - n
    x = torch.cat([images_u8.cpu(), images_u8.new_zeros(pad, 28, 28).cpu()]) if pad else images_u8.cpu()
    return x.reshape(rows, columns, 28, 28).permute(0, 2, 1, 3).reshape(1, rows * 28, columns * 28)


class TBLogger:
    def __init__(self, log_dir: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise TensorBoardMissing(
                f"--tensorboard needs the tensorboard package ({e}); install it with: pip install tensorboard"
            ) from None
        self.writer = SummaryWriter(log_dir)

    def start(self, model, sample_images_u8: torch.Tensor, sample_inputs: torch.Tensor) -> None:
        self.writer.add_image("images", image_grid(sample_images_u8[:64]), 0)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.trace, used by add_graph
                self.writer.add_graph(model, sample_inputs)
        except Exception as e:  # tracing is best effort; training goes on
            warnings.warn(f"TensorBoard graph not written: {e}", stacklevel=2)

    def epoch(self, epoch: int, record: dict, model) -> None:
        w = self.writer
        w.add_scalar("Loss", record["train_loss"], epoch)
        w.add_scalar("Number Correct", record["train_correct"], epoch)
        w.add_scalar("Accuracy", record["train_acc"], epoch)
        w.add_scalar("Test Accuracy", record["test_acc"], epoch)
        w.add_scalar("Learning Rate", record["lr"], epoch)
        for name, p in model.named_parameters():
            w.add_histogram(name, p.detach().cpu(), epoch)
            if p.grad is not None:
                w.add_histogram(f"{name}.grad", p.grad.detach().cpu(), epoch)

    def close(self) -> None:
        self.writer.close()
