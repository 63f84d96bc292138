"""No file the app writes is written through a link: the run
folder's lock file is opened with O_NOFOLLOW and must be a regular file with
one link; every other file is written atomically (a temp file renamed over the
name), which replaces a symlink instead of following it. A user's file that a
link points at is never truncated or changed."""

from __future__ import annotations

import os

import pytest
from fmnist_app_helpers import exit_code, no_torchrun_env, write_dataset  # noqa: F401  (fixture)

from fmnist_ext import atomic, train
from fmnist_ext.train import runfolder

SYN = ["--no-verify", "--no-download", "--no-progress"]
MINE = "a user's precious file\n"


@pytest.fixture
def victim(tmp_path):
    v = tmp_path / "victim.txt"
    v.write_text(MINE)
    return v


def _link_kinds(victim):
    return {
        "symlink": lambda p: p.symlink_to(victim),
        "dangling symlink": lambda p: p.symlink_to(victim.parent / "not-there-yet"),
        "hard link": lambda p: os.link(victim, p),
        "fifo": lambda p: os.mkfifo(p),
    }


@pytest.mark.parametrize("kind", ["symlink", "dangling symlink", "hard link", "fifo"])
def test_the_lock_file_is_never_written_through_a_link(tmp_path, victim, kind):
    folder = tmp_path / "run"
    folder.mkdir()
    _link_kinds(victim)[kind](folder / runfolder.LOCK_NAME)
    with pytest.raises(runfolder.RunFolderError, match=r"lock file .*refusing"), runfolder.RunFolder(folder):
        pass
    assert victim.read_text() == MINE
    assert not (victim.parent / "not-there-yet").exists()


@pytest.mark.parametrize("resume", [False, True])
def test_train_refuses_a_linked_lock_file_in_one_line(tmp_path, victim, capsys, resume):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / runfolder.LOCK_NAME).symlink_to(victim)
    (folder / "checkpoint.pt").write_bytes(b"")  # --resume needs one to get as far as the lock
    argv = ["--data-dir", str(tmp_path / "no-data"), *SYN, "--out", str(folder), *(["--resume"] if resume else [])]
    assert exit_code(train.main, argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "is a symbolic link" in err, err
    assert victim.read_text() == MINE


@pytest.mark.parametrize("name", ["metrics.jsonl", "summary.json", "checkpoint.pt", "sweep.csv", "curves.png"])
def test_atomic_writes_replace_a_symlink_and_leave_its_target(tmp_path, victim, name):
    link = tmp_path / name
    link.symlink_to(victim)
    os.chmod(victim, 0o600)
    if name.endswith(".png"):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig = plt.figure()
        atomic.save_figure(fig, link)
        plt.close(fig)
    else:
        atomic.write_text(link, "new\n")
    assert victim.read_text() == MINE
    assert not link.is_symlink() and link.is_file()
    assert link.stat().st_mode & 0o777 == 0o666 & ~atomic.current_umask()  # the target lends it no mode


def test_a_new_run_refuses_run_file_names_that_are_dangling_symlinks(tmp_path, victim, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "metrics.jsonl").symlink_to(tmp_path / "elsewhere.jsonl")
    assert exit_code(train.main, ["--data-dir", str(tmp_path / "none"), *SYN, "--out", str(folder)]) == 2
    assert "already holds a run (metrics.jsonl)" in capsys.readouterr().err
    assert not (tmp_path / "elsewhere.jsonl").exists()


def test_resume_refuses_a_symlinked_tensorboard_folder(tmp_path, capsys):
    pytest.importorskip("torch.utils.tensorboard")
    syn = write_dataset(tmp_path / "syn", n_train=60, n_test=20)
    out = tmp_path / "run"
    assert exit_code(train.main, ["--data-dir", str(syn), *SYN, "--out", str(out), "--epochs", "1"]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / "tensorboard").symlink_to(elsewhere)
    capsys.readouterr()
    argv = ["--data-dir", str(syn), *SYN, "--out", str(out), "--resume", "--tensorboard"]
    assert exit_code(train.main, argv) == 2
    assert "is a symbolic link" in capsys.readouterr().err
    assert list(elsewhere.iterdir()) == []
