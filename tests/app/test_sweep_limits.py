"""Sweeps at their limits: seeds that torch treats
as one, as many locked run folders as the descriptor limit allows, and an
--out that is not valid UTF-8."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from fmnist_app_helpers import exit_code, no_torchrun_env, write_dataset  # noqa: F401  (fixture)

from fmnist_ext import train

SYN = ["--no-verify", "--no-download", "--no-progress"]


def test_seeds_torch_maps_to_one_are_the_same_run(tmp_path, capsys):
    # torch.manual_seed(-1) seeds with 2**64 - 1: the sweep trained the same run twice
    argv = ["--data-dir", str(tmp_path / "none"), *SYN, "--out", str(tmp_path / "s")]
    assert exit_code(train.main, [*argv, "--sweep", "seed=-1,18446744073709551615"]) == 2
    err = capsys.readouterr().err
    assert "runs seed=-1 and seed=18446744073709551615 are the same" in err, err
    assert not (tmp_path / "s").exists()


def _sweep_under_limit(tmp_path, runs: int, soft: int, hard: int) -> subprocess.CompletedProcess:
    """A sweep of `runs` seeds with no data (it stops at the data load, after locking every folder)."""
    seeds = ",".join(map(str, range(runs)))
    argv = ["-m", "fmnist_ext.train", "--data-dir", str(tmp_path / "none"), *SYN, "--out", str(tmp_path / "s")]
    return subprocess.run(
        [sys.executable, *argv, "--sweep", f"seed={seeds}"],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)),
    )


def test_a_sweep_raises_the_soft_descriptor_limit_for_its_locks(tmp_path):
    # each run folder holds its lock descriptor: 300 runs under a soft limit of 200 failed with EMFILE
    p = _sweep_under_limit(tmp_path, runs=300, soft=200, hard=4096)
    assert p.returncode == 2, p.stderr
    assert "--data-dir" in p.stderr and "Too many open files" not in p.stderr, p.stderr  # got as far as the data
    assert not (tmp_path / "s").exists()


def test_a_sweep_beyond_the_hard_limit_is_refused_up_front(tmp_path):
    p = _sweep_under_limit(tmp_path, runs=300, soft=200, hard=200)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert "301 locked folders" in lines[0] and "ulimit -Hn" in lines[0], p.stderr
    assert not (tmp_path / "s").exists()


@pytest.mark.skipif(sys.platform != "linux", reason="file names as bytes")
def test_a_sweep_into_a_non_utf8_folder_writes_its_table(tmp_path):
    # every run trained, then sweep.csv was lost to UnicodeEncodeError
    syn = write_dataset(tmp_path / "syn", n_train=40, n_test=20)
    out = os.path.join(os.fsencode(tmp_path), b"sweep-\xff")
    argv = [sys.executable, "-m", "fmnist_ext.train", "--data-dir", os.fsencode(syn), *SYN, "--out", out]
    argv += ["--epochs", "1", "--batch-size", "20", "--sweep", "lr=0.01,0.02"]
    env = {**os.environ, "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}
    p = subprocess.run(argv, capture_output=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr.decode(errors="replace")
    table = Path(os.fsdecode(os.path.join(out, b"sweep.csv"))).read_bytes()
    assert b"sweep-\xff/lr=0.01" in table and b"Traceback" not in p.stderr
    assert b"sweep-\xff" in p.stdout  # the paths printed as the bytes they are
