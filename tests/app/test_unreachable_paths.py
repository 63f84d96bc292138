"""Paths whose state cannot be known are one-line errors naming the argument,
never tracebacks: a folder the user may not enter (EACCES)
and a name component over 255 bytes (ENAMETOOLONG), in every command that
takes a path. Python's Path.exists/is_dir/is_file raise for both; every check
goes through fmnist_ext.paths.kind.

Root passes permission checks, so the EACCES cases run the command without the
DAC capabilities (setpriv), as an ordinary user would run it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import NO_NET, untrained_checkpoint
from fmnist_app_helpers import exit_code, no_torchrun_env, write_dataset  # noqa: F401  (fixture)

from fmnist_ext import evaluate, predict, train, viz

DROP = "-dac_override,-dac_read_search"
LONG = "x" * 300  # one name component over NAME_MAX (255 bytes)


def _without_dac() -> list[str]:
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot drop the DAC capabilities")
    return ["setpriv", "--inh-caps", DROP, "--bounding-set", DROP]


@pytest.fixture
def places(tmp_path):
    """A data folder, a checkpoint, and a folder nobody may enter."""
    syn = write_dataset(tmp_path / "syn", n_train=40, n_test=20)
    ckpt = untrained_checkpoint(tmp_path / "ckpt.pt")
    locked = tmp_path / "locked"
    (locked / "run").mkdir(parents=True)
    os.chmod(locked, 0)
    yield syn, ckpt, locked
    os.chmod(locked, 0o700)


def _commands(syn, ckpt, bad):
    """(argument named in the error, argv of `python -m ...`, extra environment) per path a command takes."""
    data = ["--data-dir", str(syn), *NO_NET]
    return {
        "train --out": ("--out", ["fmnist_ext.train", *data, "--out", str(bad / "run")], {}),
        "train --data-dir": ("--data-dir", ["fmnist_ext.train", "--data-dir", str(bad), *NO_NET], {}),
        "train FMNIST_DATA": ("FMNIST_DATA", ["fmnist_ext.train", *NO_NET], {"FMNIST_DATA": str(bad)}),
        "evaluate checkpoint": ("checkpoint", ["fmnist_ext.evaluate", str(bad / "c.pt"), *data], {}),
        "predict checkpoint": ("checkpoint", ["fmnist_ext.predict", str(bad / "c.pt"), str(ckpt)], {}),
        "viz curves": ("run_dir", ["fmnist_ext.viz", "curves", str(bad / "run")], {}),
        "viz sprite --out": ("--out", ["fmnist_ext.viz", "sprite", *data, "--out", str(bad / "s.png")], {}),
        "viz sprite --data-dir": ("--data-dir", ["fmnist_ext.viz", "sprite", "--data-dir", str(bad), *NO_NET], {}),
    }


CASES = list(_commands(Path("s"), Path("c"), Path("b")))


def _check(rc: int, err: str, arg: str, words: str) -> None:
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2 and "Traceback" not in err and len(lines) == 1, err
    assert arg in lines[0] and words in lines[0], err


@pytest.mark.parametrize("case", CASES)
def test_a_folder_that_may_not_be_entered(places, tmp_path, case):
    syn, ckpt, locked = places
    arg, argv, env = _commands(syn, ckpt, locked / "run")[case]
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache"), **env}
    p = subprocess.run(
        [*_without_dac(), sys.executable, "-m", *argv], capture_output=True, text=True, env=env, timeout=300
    )
    _check(p.returncode, p.stderr, arg, "permission denied")


MAINS = {"fmnist_ext.train": train.main, "fmnist_ext.evaluate": evaluate.main, "fmnist_ext.predict": predict.main}


@pytest.mark.parametrize("case", CASES)
def test_a_name_over_255_bytes(tmp_path, capsys, monkeypatch, case):
    syn = write_dataset(tmp_path / "syn", n_train=40, n_test=20)
    ckpt = untrained_checkpoint(tmp_path / "ckpt.pt")
    arg, argv, env = _commands(syn, ckpt, tmp_path / LONG)[case]
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    rc = exit_code(MAINS.get(argv[0], viz.main), argv[1:])
    _check(rc, capsys.readouterr().err, arg, "too long")


def test_kind_names_the_path_and_the_reason(tmp_path):
    from fmnist_ext import paths

    assert paths.kind(tmp_path) == paths.FOLDER
    assert paths.kind(tmp_path / "nothing") == paths.MISSING
    assert paths.kind(tmp_path / "nothing" / "below") == paths.MISSING
    with pytest.raises(paths.PathError, match=f"{LONG}: cannot be checked: a name in it is too long"):
        paths.kind(tmp_path / LONG)
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(paths.PathError, match="symbolic links"):
        paths.kind(loop)
