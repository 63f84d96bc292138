"""A run that diverges to NaN/inf stops: at the first
non-finite loss, before its step, with one clear message and exit status 1;
the last checkpoint on disk is the last finite one; every JSON file stays
valid JSON; a sweep reports the run as diverged and goes on."""

from __future__ import annotations

import json

import pytest
import torch
from fmnist_app_helpers import exit_code, no_torchrun_env, write_dataset  # noqa: F401  (fixture)

from fmnist_ext import checkpoint, train
from fmnist_ext.train import recipes
from fmnist_ext.train.state import resume_problems

SYN = ["--no-verify", "--no-download", "--no-progress"]


@pytest.fixture
def syn(tmp_path):
    return write_dataset(tmp_path / "syn", n_train=60, n_test=20)


def _strict_json_lines(path):
    def refuse(token):
        raise AssertionError(f"{path}: {token} is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_nan_in_epoch_two_keeps_epoch_one(syn, tmp_path, capsys, monkeypatch):
    real = recipes.make_criterion
    calls = []

    def poisoned(smoothing):
        criterion = real(smoothing)

        def loss(logits, y):
            calls.append(1)
            out = criterion(logits, y)
            return out * float("nan") if len(calls) > 3 else out  # epoch 2's first batch

        return loss

    monkeypatch.setattr(recipes, "make_criterion", poisoned)
    out = tmp_path / "run"
    argv = ["--data-dir", str(syn), *SYN, "--out", str(out), "--epochs", "3", "--batch-size", "20"]
    assert exit_code(train.main, argv) == 1
    err = capsys.readouterr().err
    assert "training diverged (epoch 2, batch 1: the training loss is nan)" in err and "Traceback" not in err, err
    ck = checkpoint.load(out / "checkpoint.pt", check=resume_problems)
    assert ck["epoch"] == 1 and all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert [r["epoch"] for r in _strict_json_lines(out / "metrics.jsonl")] == [1]
    assert not (out / "summary.json").exists()


@pytest.mark.parametrize("extra", [[], ["--tensorboard"]], ids=["plain", "tensorboard"])
def test_a_huge_learning_rate_stops_at_once(syn, tmp_path, capsys, extra):
    if extra:
        pytest.importorskip("torch.utils.tensorboard")
    out = tmp_path / "run"
    argv = ["--data-dir", str(syn), *SYN, "--out", str(out), "--epochs", "3", "--batch-size", "20", "--lr", "1e30"]
    assert exit_code(train.main, [*argv, *extra]) == 1
    err = capsys.readouterr().err
    assert "training diverged" in err and "try a lower --lr" in err and "Traceback" not in err, err
    if (out / "checkpoint.pt").exists():
        ck = checkpoint.load(out / "checkpoint.pt")
        assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    if (out / "metrics.jsonl").exists():
        _strict_json_lines(out / "metrics.jsonl")


def test_a_sweep_reports_a_diverged_run_and_goes_on(syn, tmp_path, capsys):
    base = tmp_path / "sweep"
    argv = ["--data-dir", str(syn), *SYN, "--out", str(base), "--epochs", "1", "--batch-size", "20"]
    assert exit_code(train.main, [*argv, "--sweep", "lr=1e30,0.01"]) == 1
    captured = capsys.readouterr()
    assert "1 run(s) diverged: lr=1e+30" in captured.err, captured.err
    rows = (base / "sweep.csv").read_text().splitlines()
    assert rows[0].startswith("lr,test_acc") and ",done," in rows[1] and ",,,,,diverged," in rows[2], rows
    assert json.loads((base / "lr=0.01" / "summary.json").read_text())["test_acc"] >= 0
