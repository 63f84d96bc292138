"""Stopping a run on request (Ctrl-C, SIGINT) without losing it.

The first Ctrl-C sets a flag; the loop looks at it after every batch (a
collective under DDP, so every process stops at the same batch), saves a
checkpoint and raises Interrupted; the command prints how to resume and exits
130. A second Ctrl-C raises KeyboardInterrupt at once: the last checkpoint
saved stays as it was.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import torch

from .distributed import Dist, all_reduce_sum

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a tool stopped by Ctrl-C


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
        # signal handlers can only be set from the main thread (the tests call main() from others too)
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
