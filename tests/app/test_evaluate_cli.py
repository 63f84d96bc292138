"""evaluate: only the test files needed, the data folder printed, one-line errors, Ctrl-C
(exit 130) and a closed stdout pipe (exit 141) without a traceback."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from cli_helpers import (
    NO_NET,
    assert_quiet,
    closed_pipe_run,
    one_error_line,
    signal_while_loading,
    t10k_only_folder,
    untrained_checkpoint,
)
from fmnist_app_helpers import exit_code

from fmnist_ext import checkpoint, data, evaluate


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return untrained_checkpoint(tmp_path_factory.mktemp("ck") / "checkpoint.pt")


@pytest.fixture
def test_only(tmp_path) -> Path:
    return t10k_only_folder(tmp_path / "t10k")


def test_evaluate_needs_only_the_test_files_and_says_which_folder(ckpt, test_only, capsys):
    assert evaluate.main([str(ckpt), "--data-dir", str(test_only), *NO_NET, "--json"]) == 0
    out, err = capsys.readouterr()
    assert f"data: {test_only} (from --data-dir)" in err
    res = json.loads(out)
    assert res["data_folder"] == str(test_only) and sum(map(sum, res["confusion_matrix"])) == 50


def test_evaluate_bad_fmnist_data_is_one_line(ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path / "nowhere"))
    assert exit_code(evaluate.main, [str(ckpt), "--no-download"]) == 2
    line = one_error_line(capsys)
    assert f"{data.DATA_ENV}={tmp_path / 'nowhere'}: does not exist" in line


def test_evaluate_checkpoint_of_another_shape_is_one_line(tmp_path, test_only, capsys):
    bad = tmp_path / "other.pt"
    checkpoint.save(bad, {"model": {"conv1.weight": torch.zeros(3)}, "kernels": "fused"})
    assert exit_code(evaluate.main, [str(bad), "--data-dir", str(test_only), *NO_NET]) == 2
    line = one_error_line(capsys)
    assert "argument checkpoint" in line and str(bad) in line and "not the FashionCNN's" in line
    assert "conv1.weight has shape [3]" in line


def test_evaluate_ctrl_c_while_loading_is_exit_130(ckpt, monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "load", interrupted)
    assert evaluate.main([str(ckpt), "--no-download"]) == 130
    assert one_error_line(capsys).endswith("fmnist_ext.evaluate: interrupted")


def test_evaluate_real_sigint_while_loading(ckpt, tmp_path):
    # A real Ctrl-C (SIGINT) in another process, while data.load is running.
    rc, err = signal_while_loading("evaluate", [str(ckpt), "--no-download"], signal.SIGINT)
    assert rc == 130, err
    assert err.strip().splitlines() == ["python -m fmnist_ext.evaluate: interrupted"], err


def test_evaluate_into_a_closed_pipe(ckpt, test_only):
    rc, err = closed_pipe_run(["-m", "fmnist_ext.evaluate", str(ckpt), "--data-dir", str(test_only), *NO_NET])
    assert rc == 141, (rc, err)
    assert_quiet(err)
