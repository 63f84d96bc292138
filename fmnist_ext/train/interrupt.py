"""Stopping a run on request (Ctrl-C or SIGTERM) without losing it.

The first Ctrl-C (SIGINT) or SIGTERM sets a flag; the loop looks at it after
every batch (a collective under DDP, so every process stops at the same
batch), saves a checkpoint and raises Interrupted; the command prints how to
resume (resume_command: under torchrun, with torchrun) and exits 130 (143
for SIGTERM). A second one raises KeyboardInterrupt at once: the last
checkpoint saved stays as it was.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from pathlib import Path

import torch

from .. import cli
from .distributed import Dist, all_reduce_sum

EXIT_INTERRUPTED = cli.EXIT_INTERRUPTED  # 128 + SIGINT


# SIGTERM (kill, docker stop, SLURM, torchrun) stops a run as Ctrl-C does: its progress is saved.
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """First Ctrl-C or SIGTERM: finish the batch, save a checkpoint, exit 128 + the
    signal. Second: abort now (the last checkpoint saved stays as it was)."""

    def __init__(self, quiet: bool):
        self.requested = False
        self.signum = signal.SIGINT
        self.quiet = quiet
        self._old: dict = {}

    @property
    def exit_status(self) -> int:
        return 128 + self.signum

    def _handler(self, signum, frame):
        if self.requested:
            raise cli.Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        self.requested, self.signum = True, signum
        if not self.quiet:
            what = "Terminated (SIGTERM)" if signum == signal.SIGTERM else "Interrupted"
            print(
                f"\n{what}: finishing this batch and saving a checkpoint (Ctrl-C again to abort without saving)",
                file=sys.stderr,
                flush=True,
            )

    def __enter__(self):
        # signal handlers can only be set from the main thread (the tests call main() from others too)
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handler) for s in SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}

    def check(self, d: Dist, device) -> bool:
        """Whether any rank was asked to stop (a collective under DDP)."""
        if not d.enabled:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        return bool(all_reduce_sum(flag, d).item() > 0)


class Interrupted(Exception):
    """Stopped on request after saving `out`/checkpoint.pt; exit with `status`."""

    def __init__(self, where: str, out: Path, status: int = EXIT_INTERRUPTED):
        super().__init__(where)
        self.out = out
        self.status = status


def resume_command(out: Path, d: Dist) -> str:
    """The command line that continues the run in `out`, runnable as printed: under
    torchrun, with torchrun and the same number of processes (a resume needs it)."""
    args = f"--out {shlex.quote(str(out))} --resume"
    if not d.enabled:
        return f"{cli.prog('fmnist_ext.train')} {args}"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", d.world_size))
    if local == d.world_size:
        launcher = f"python -m torch.distributed.run --standalone --nproc_per_node={local}"
    else:  # several nodes: the same layout, and the rendezvous the user chose
        nodes = d.world_size // max(local, 1)
        launcher = f"python -m torch.distributed.run --nnodes={nodes} --nproc_per_node={local} RENDEZVOUS-OPTIONS"
    return f"{launcher} -m fmnist_ext.train {args}"
