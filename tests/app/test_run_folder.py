"""train's run folders and command line: checked before anything is created or
loaded, locked while a run owns them, never overwritten; the last-batch rule;
resuming with another process count; full disks; Ctrl-C while loading."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from fmnist_app_helpers import exit_code, no_torchrun_env, write_dataset  # noqa: F401  (fixture)

from fmnist_ext import checkpoint, data, train
from fmnist_ext.data.batches import Batches, batch_count, plan_epoch
from fmnist_ext.train import runfolder
from fmnist_ext.train.state import resume_problems

SYN = ["--no-verify", "--no-download", "--no-progress"]


@pytest.fixture
def syn(tmp_path):
    """60 images: batches of 10 or 30 divide them (the last-batch rule has its own tests)."""
    return write_dataset(tmp_path / "syn", n_train=60, n_test=20)


def _train(syn, out, *extra):
    return exit_code(train.main, ["--data-dir", str(syn), *SYN, "--out", str(out), *extra])


def _one_line(capsys, *words) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    for w in words:
        assert w in lines[0], err
    return lines[0]


@pytest.fixture
def no_data_load(monkeypatch):
    """Fails the test if the data are loaded: the mistake must be found before."""

    def load(*a, **k):
        raise AssertionError("the data were loaded before the mistake was reported")

    monkeypatch.setattr(data, "load", load)


# ------------------------------------------------------------------ up-front checks (item 6)


def test_out_at_an_existing_file(tmp_path, capsys, no_data_load):
    f = tmp_path / "file"
    f.write_text("mine")
    assert _train(tmp_path, f) == 2
    _one_line(capsys, "--out", f"{f} exists and is not a folder")
    assert f.read_text() == "mine"


def test_out_under_a_file(tmp_path, capsys, no_data_load):
    f = tmp_path / "file"
    f.write_text("mine")
    assert _train(tmp_path, f / "run" / "deeper") == 2
    _one_line(capsys, "--out", f"{f} is a file")


def test_out_where_folders_cannot_be_made(tmp_path, capsys, no_data_load):
    """/proc refuses new folders even to root (for whom every permission check passes)."""
    assert _train(tmp_path, "/proc/fmnist-ext-test-run") == 2
    line = _one_line(capsys, "--out", "/proc")
    assert "cannot create /proc/fmnist-ext-test-run" in line or "/proc is not writable" in line  # root / not root


def test_out_in_an_unwritable_folder(tmp_path, capsys, no_data_load, monkeypatch):
    real = os.access
    monkeypatch.setattr(runfolder.os, "access", lambda p, m: False if str(p) == str(tmp_path) else real(p, m))
    assert _train(tmp_path, tmp_path / "run") == 2
    _one_line(capsys, "--out", f"{tmp_path} is not writable")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--seed", str(2**64)], ["--seed", "[-2**63, 2**64)"]),
        (["--seed", str(-(2**63) - 1)], ["--seed"]),
        (["--sweep", "seed=x"], ["--sweep", "seed", "'x'"]),
        (["--sweep", f"seed=1,{2**70}"], ["--sweep", "seed"]),
        (["--batch-size", "1"], ["--batch-size", ">= 2"]),
        (["--sweep", "batch_size=1,10"], ["--sweep", "batch_size", ">= 2"]),
        (["--sweep", "lr=0.01,0.010"], ["--sweep", "same setting"]),
        (["--sweep", "lr=0.01,0.01", "seed=1"], ["--sweep", "same setting"]),
        (["--lr", "0.1", "--sweep", "lr=0.01,0.02"], ["--sweep", "lr also given as --lr"]),
        # no upper bound (100000 asked for 40 TB, a 20-digit value overflowed), after the data load
        (["--crop-pad", "100000"], ["--crop-pad", "[0, 27]"]),
        (["--crop-pad", "99999999999999999999"], ["--crop-pad", "[0, 27]"]),
        (["--sweep", "crop_pad=1,28"], ["--sweep", "crop_pad", "[0, 27]"]),
        (
            [
                "--sweep",
                "lr=0.0123456789012345",
                "weight_decay=0.000123456789012345",
                "label_smoothing=0.123456789012345",
                "ema=0.123456789012345",
                "seed=18446744073709551615",
                "batch_size=123456789012345",
                "clean_epochs=123456789",
                "crop_pad=27",
                "epochs=123456789012345",
                "schedule=onecycle",
                "optimizer=adamw",
                "kernels=stock",
            ],
            ["--sweep", "longer than 255 bytes"],
        ),
    ],
)
def test_bad_command_lines_are_one_line_with_nothing_created(argv, words, tmp_path, capsys, no_data_load):
    out = tmp_path / "runs" / "x"
    assert _train(tmp_path, out, *argv) == 2
    _one_line(capsys, *words)
    assert not (tmp_path / "runs").exists()


def test_seed_limits_are_torchs(syn, tmp_path):
    assert _train(syn, tmp_path / "a", "--seed", str(2**64 - 1), "--epochs", "1", "--batch-size", "30") == 0
    assert checkpoint.load(tmp_path / "a" / "checkpoint.pt")["config"]["seed"] == 2**64 - 1


def test_ctrl_c_while_the_data_load(tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "load", interrupted)
    out = tmp_path / "runs" / "x"
    assert _train(tmp_path, out) == train.EXIT_INTERRUPTED
    _one_line(capsys, "interrupted before training started")
    assert not (tmp_path / "runs").exists()  # the folders it made are gone again


def _fail_checkpoint_write(monkeypatch, after: int):
    """os.fsync raises ENOSPC for the checkpoint temp file after `after` good checkpoint writes."""
    real, seen = os.fsync, {"n": 0}

    def fsync(fd):
        if ".checkpoint.pt." in os.readlink(f"/proc/self/fd/{fd}"):
            seen["n"] += 1
            if seen["n"] > after:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_full_disk_while_saving_keeps_the_previous_checkpoint(syn, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    _fail_checkpoint_write(monkeypatch, after=1)
    assert _train(syn, out, "--epochs", "3", "--batch-size", "30") == 1
    line = _one_line(
        capsys,
        f"cannot write {out / 'checkpoint.pt'}: No space left on device",
        "previous version of the file (if any) is unchanged",
    )
    assert line.startswith("python -m fmnist_ext.train: error:")
    monkeypatch.undo()
    assert checkpoint.load(out / "checkpoint.pt", check=resume_problems)["epoch"] == 1
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert _train(syn, out, "--resume") == 0  # and the run goes on from there
    assert checkpoint.load(out / "checkpoint.pt")["epoch"] == 3


# ------------------------------------------------------------------ nothing overwritten (item 9)


def test_fresh_run_refuses_a_folder_with_run_files(syn, tmp_path, capsys, no_data_load):
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("my notes")
    assert _train(syn, out) == 2
    _one_line(capsys, "--out", "already holds a run (summary.json)")
    assert (out / "summary.json").read_text() == "my notes"
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]  # lock file gone too


# ------------------------------------------------------------------ locking (item 3)


def test_lock_names_its_holder_and_is_released(tmp_path):
    with runfolder.RunFolder(tmp_path / "r") as held:
        assert held.lock_path.exists()
        with (
            pytest.raises(runfolder.RunFolderError, match=rf"in use by another run \(pid {os.getpid()} on host"),
            runfolder.RunFolder(tmp_path / "r"),
        ):
            pass
    assert not (tmp_path / "r").exists()  # created, nothing written: removed again
    with runfolder.RunFolder(tmp_path / "r"):
        pass


def test_two_processes_on_one_folder(syn, tmp_path):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "fmnist_ext.train", "--data-dir", str(syn), *SYN, "--out", str(out)]
    first = subprocess.Popen(
        [*cmd, "--epochs", "100000", "--batch-size", "30"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lock = out / runfolder.LOCK_NAME
        deadline = time.time() + 120
        while not (lock.exists() and lock.read_text()) and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read()
        second = subprocess.run([*cmd, "--epochs", "1"], env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        err = second.stderr.strip().splitlines()
        assert len(err) == 1 and "in use by another run" in err[0] and f"pid {first.pid} on host" in err[0], err
        assert "started 20" in err[0]
    finally:
        first.kill()  # a crash: the OS releases the lock
        first.wait()
    with runfolder.RunFolder(out, create=False):
        pass


def test_sweep_locks_every_run_folder(syn, tmp_path, capsys, no_data_load):
    base = tmp_path / "sweep"
    with runfolder.RunFolder(base / "lr=0.001"):
        assert _train(syn, base, "--sweep", "lr=0.01,0.001") == 2
        _one_line(capsys, "--out", f"{base / 'lr=0.001'} is in use by another run")
    assert not base.exists()


# ------------------------------------------------------------------ sweeps (item 7)


def test_sweep_checks_every_folder_before_training(syn, tmp_path, capsys, no_data_load):
    base = tmp_path / "sweep"
    (base / "lr=0.001").mkdir(parents=True)
    (base / "lr=0.001" / "checkpoint.pt").write_bytes(b"an earlier run")
    assert _train(syn, base, "--sweep", "lr=0.01,0.001") == 2
    _one_line(capsys, "--out", f"{base / 'lr=0.001'} already holds a run (checkpoint.pt)")
    assert sorted(p.name for p in base.iterdir()) == ["lr=0.001"]  # lr=0.01 was not trained first


def test_sweep_refuses_an_earlier_sweep_csv(syn, tmp_path, capsys, no_data_load):
    base = tmp_path / "sweep"
    base.mkdir()
    (base / "sweep.csv").write_text("earlier results")
    assert _train(syn, base, "--sweep", "lr=0.01,0.001") == 2
    _one_line(capsys, "sweep.csv exists")
    assert (base / "sweep.csv").read_text() == "earlier results"


def test_interrupted_sweep_names_the_run_to_resume(syn, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train.StopRequest, "check", lambda self, d, device: True)
    base = tmp_path / "sweep"
    assert _train(syn, base, "--sweep", "lr=0.01,0.001", "--epochs", "2", "--batch-size", "30") == 130
    err = capsys.readouterr().err
    assert f"--out {base / 'lr=0.01'} --resume" in err and "sweep stops here" in err
    assert checkpoint.load(base / "lr=0.01" / "checkpoint.pt")["step"] == 1


# ------------------------------------------------------------------ the last batch (item 4)


@pytest.mark.parametrize(
    "n, bs, sizes",
    [
        (61, 10, [10] * 5 + [11]),
        (60, 10, [10] * 6),
        (62, 10, [10] * 6 + [2]),
        (11, 10, [11]),
        (3, 2, [3]),
        (5, 2, [2, 3]),
        (9, 100, [9]),
    ],
)
def test_last_batch_of_one_joins_the_previous(n, bs, sizes):
    images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8)
    labels = torch.arange(n) % 10
    plan = plan_epoch(n, torch.Generator().manual_seed(0))
    got = list(Batches(images, labels, plan, bs))
    assert [x.shape[0] for x, _ in got] == sizes == [len(y) for _, y in got]
    assert batch_count(n, bs) == len(sizes) == len(Batches(images, labels, plan, bs))
    assert torch.equal(torch.cat([y for _, y in got]), labels[plan.order])  # every image, once
    resumed = list(Batches(images, labels, plan, bs, start=len(sizes) - 1))
    assert len(resumed) == 1 and torch.equal(resumed[0][1], got[-1][1])


def test_last_batch_rule_on_ddp_shards():
    """123 images over 2 processes: 61 each, batches of 10: the single last image of each shard joins in."""
    images = torch.randint(0, 256, (123, 28, 28), dtype=torch.uint8)
    labels = torch.arange(123) % 10
    shards = [plan_epoch(123, torch.Generator().manual_seed(1), rank=r, world_size=2) for r in range(2)]
    for plan in shards:
        assert [len(y) for _, y in Batches(images, labels, plan, 10)] == [10] * 5 + [11]


def test_training_with_a_last_batch_of_one(tmp_path):
    syn, out = write_dataset(tmp_path / "syn61", n_train=61, n_test=20), tmp_path / "run"
    assert _train(syn, out, "--epochs", "2", "--batch-size", "10", "--ema", "0.9") == 0  # 61 images
    ck = checkpoint.load(out / "checkpoint.pt")
    assert ck["ema"]["updates"] == 2 * 6  # 6 optimizer steps an epoch, the last with 11 images
    assert ck["train_images"] == 61


def test_training_with_too_few_images(tmp_path, capsys):
    syn = write_dataset(tmp_path / "one", n_train=1, n_test=5)
    assert _train(syn, tmp_path / "run") == 2
    _one_line(capsys, "--data-dir", "1 image(s)")
    assert not (tmp_path / "run").exists()  # refused after the data loaded: the folder it made is gone


# ------------------------------------------------------------------ resume checks (items 5, 9)


@pytest.fixture
def interrupted_run(syn, tmp_path, monkeypatch):
    """A run stopped mid-epoch (after batch 1 of epoch 1)."""
    out = tmp_path / "run"
    calls = {"n": 0}
    original = train.StopRequest.check

    def stop_once(self, d, device):
        calls["n"] += 1
        return calls["n"] == 1

    monkeypatch.setattr(train.StopRequest, "check", stop_once)
    assert _train(syn, out, "--epochs", "2", "--batch-size", "30") == 130
    monkeypatch.setattr(train.StopRequest, "check", original)
    return out


def _rewrite(path, **changes):
    ck = checkpoint.load(path)
    ck.update(changes)
    checkpoint.save(path, {k: v for k, v in ck.items() if k != "format"})


def test_resume_with_another_process_count_is_refused(syn, interrupted_run, capsys):
    _rewrite(interrupted_run / "checkpoint.pt", world_size=2)
    assert _train(syn, interrupted_run, "--resume") == 2
    _one_line(capsys, "--resume", "written by 2 training process(es), this run has 1", "torchrun --nproc_per_node=2")


def test_resume_under_torchrun_env_of_a_single_process_checkpoint(syn, interrupted_run, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert _train(syn, interrupted_run, "--resume") == 2  # refused before any process group starts
    _one_line(capsys, "written by 1 training process(es), this run has 3", "without torchrun")


def test_resume_with_other_data_is_refused(interrupted_run, tmp_path, capsys):
    other = write_dataset(tmp_path / "other", n_train=90, n_test=20)
    assert _train(other, interrupted_run, "--resume") == 2
    _one_line(capsys, "--resume", "trained on 60 training images, these data have 90")


def test_resume_with_a_step_past_the_epoch_is_refused(syn, interrupted_run, capsys):
    _rewrite(interrupted_run / "checkpoint.pt", step=50)
    assert _train(syn, interrupted_run, "--resume") == 2
    _one_line(capsys, "--resume", "cannot resume from it", "step 50 is past the 2 batches")


def test_resume_finishes_and_the_metrics_are_whole(syn, interrupted_run, capsys):
    assert _train(syn, interrupted_run, "--resume") == 0
    assert "at epoch 1, batch 2 of 2" in capsys.readouterr().out
    lines = [json.loads(x) for x in (interrupted_run / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2]
    # resuming a finished run says so (it only recomputes the final results)
    assert _train(syn, interrupted_run, "--resume") == 0
    out = capsys.readouterr().out
    assert "already finished (2 epochs)" in out and "epoch 3" not in out


def test_help_tells_the_rules(capsys):
    assert exit_code(train.main, ["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "joins the previous batch" in out and "locked" in out and "number of processes" in out
