"""Helpers for the command-line error tests: exit codes, the one-line error, a checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from fmnist_app_helpers import write_dataset

from fmnist_ext import checkpoint
from fmnist_ext.data import idx
from fmnist_ext.model import FashionCNN

NO_NET = ["--no-verify", "--no-download"]


def one_error_line(capsys) -> str:
    """The only line on stderr (no traceback)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def untrained_checkpoint(path: Path) -> Path:
    """An untrained model's checkpoint: enough to run the commands end to end."""
    torch.manual_seed(0)
    checkpoint.save(path, {"model": FashionCNN("fused").state_dict(), "kernels": "fused"})
    return path


def t10k_only_folder(folder: Path, n_test: int = 50) -> Path:
    """A data folder with the two t10k files and nothing else."""
    write_dataset(folder, n_train=20, n_test=n_test)
    for key in idx.SPLITS["train"]:
        (folder / (idx.FILES[key].name + ".gz")).unlink()
    return folder


def closed_pipe_run(argv: list[str]) -> tuple[int, str]:
    """Run `python ARGV` with a stdout whose reader has gone away (like `cmd | true`)."""
    r, w = os.pipe()
    os.close(r)  # nobody will read: the first write gets EPIPE
    try:
        p = subprocess.run([sys.executable, *argv], stdout=w, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(w)
    return p.returncode, p.stderr


def assert_quiet(err: str) -> None:
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err


def popen_with_sigint(cmd: list[str], **kwargs) -> subprocess.Popen:
    """subprocess.Popen for a child that a test interrupts with SIGINT, as
    Ctrl-C would. A child inherits its parent's ignored signals, and a shell
    runs a background job (`bash scripts/test.sh &`, CI runners) with SIGINT
    ignored; Python then installs no KeyboardInterrupt handler and the signal
    would never arrive. The child restores the default disposition itself."""
    return subprocess.Popen(cmd, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kwargs)


def signal_while_loading(module: str, argv: list[str], sig: int) -> tuple[int, str]:
    """Run fmnist_ext.<module>'s main(argv) in a child whose data.load blocks;
    once loading has begun, send it `sig` (its default disposition restored,
    as popen_with_sigint does); return (exit code, stderr)."""
    code = (
        f"import sys, time; from fmnist_ext import data, {module}\n"
        "def slow(*a, **k):\n    print('loading', flush=True); time.sleep(60)\n"
        f"data.load = slow\nsys.exit({module}.main(sys.argv[1:]))\n"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(sig, signal.SIG_DFL),
    )
    try:
        assert p.stdout.readline().strip() == "loading"
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    return p.returncode, err
