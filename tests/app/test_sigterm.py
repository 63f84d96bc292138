"""SIGTERM is handled like Ctrl-C: kill, docker stop,
SLURM and torchrun send it. Training saves its progress and prints how to
resume (under torchrun: with torchrun, item 16), exit 143; the other commands
end with one line. Each child's SIGTERM disposition is set explicitly (a
background shell may have it ignored)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from cli_helpers import signal_while_loading, untrained_checkpoint
from fmnist_app_helpers import exit_code, no_torchrun_env, write_dataset  # noqa: F401  (fixture)

from fmnist_ext import checkpoint, train
from fmnist_ext.train.state import resume_problems

SYN = ["--no-verify", "--no-download", "--no-progress"]
EXIT_TERMINATED = 128 + signal.SIGTERM


def _default_sigterm():
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _popen(argv, **kw):
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigterm, **kw
    )


def _wait_for(path, proc, seconds=180):
    deadline = time.time() + seconds
    while not path.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert path.exists(), proc.communicate(timeout=60)


@pytest.fixture
def syn(tmp_path):
    return write_dataset(tmp_path / "syn", n_train=60, n_test=20)


@pytest.mark.slow
def test_sigterm_during_training_saves_and_resume_finishes(syn, tmp_path):
    out = tmp_path / "run"
    argv = ["--data-dir", str(syn), *SYN, "--out", str(out), "--epochs", "30", "--batch-size", "10"]
    proc = _popen([sys.executable, "-m", "fmnist_ext.train", *argv])
    _wait_for(out / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_TERMINATED, err
    assert "Terminated (SIGTERM): finishing this batch" in err and "Traceback" not in err, err
    assert f"resume with: python -m fmnist_ext.train --out {out} --resume" in err, err
    ck = checkpoint.load(out / "checkpoint.pt", check=resume_problems)
    assert 1 <= ck["epoch"] < 30
    assert exit_code(train.main, ["--data-dir", str(syn), *SYN, "--out", str(out), "--resume"]) == 0
    assert [r["epoch"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == list(range(1, 31))


def test_sigterm_while_evaluate_loads_is_one_line(tmp_path):
    ckpt = untrained_checkpoint(tmp_path / "ckpt.pt")
    rc, err = signal_while_loading("evaluate", [str(ckpt), "--no-download"], signal.SIGTERM)
    assert rc == EXIT_TERMINATED, err
    assert err.strip().splitlines() == ["python -m fmnist_ext.evaluate: terminated"], err


def test_sigterm_while_train_loads_leaves_nothing(syn, tmp_path):
    out = tmp_path / "run"
    rc, err = signal_while_loading("train", ["--data-dir", str(syn), *SYN, "--out", str(out)], signal.SIGTERM)
    assert rc == EXIT_TERMINATED, err
    assert "terminated before training started; nothing was trained or saved" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.slow
def test_under_torchrun_the_printed_resume_command_uses_torchrun(syn, tmp_path):
    # item 16: the command printed after a stop omitted torchrun, and running it as printed was refused
    out = tmp_path / "ddp run"
    argv = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fmnist_ext.train"]
    argv += ["--data-dir", str(syn), *SYN, "--out", str(out), "--epochs", "30", "--batch-size", "10"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = _popen([sys.executable, *argv], env=env)
    _wait_for(out / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both processes
    _, err = proc.communicate(timeout=120)
    want = (
        "resume with: python -m torch.distributed.run --standalone --nproc_per_node=2 "
        f"-m fmnist_ext.train --out '{out}' --resume"
    )
    assert want in err, err
    assert checkpoint.load(out / "checkpoint.pt", check=resume_problems)["world_size"] == 2
