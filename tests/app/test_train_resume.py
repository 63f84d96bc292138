"""Training runs that continue or change course: resume equivalence (also
after Ctrl-C), the weight EMA, clean last epochs, the baseline recipe and its
old name "seed", and older checkpoints' settings. The rest of the training
CLI is in test_train_cli.py."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from cli_helpers import popen_with_sigint
from fmnist_app_helpers import exit_code, no_torchrun_env, write_dataset  # noqa: F401  (fixture)

from fmnist_ext import checkpoint, data, evaluate, train
from fmnist_ext.train import epoch as train_epoch

SYN = ["--no-verify", "--no-download", "--no-progress"]


@pytest.fixture
def syn(tmp_path):
    return write_dataset(tmp_path / "syn", n_train=600, n_test=200)


def _env():
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    return env


def _train(syn, out, *extra):
    return exit_code(train.main, ["--data-dir", str(syn), *SYN, "--out", str(out), *extra])


@pytest.mark.parametrize(
    "stop_at,ema",
    [(2, "0.9"), (6, "0.9"), (9, "0.9"), (9, "0")],
    ids=["mid-epoch-1-ema", "end-of-epoch-1-ema", "mid-epoch-2-ema", "mid-epoch-2-no-ema"],
)
def test_resume_gives_the_same_final_weights(syn, tmp_path, monkeypatch, stop_at, ema):
    # improved recipe: one-cycle schedule, label smoothing, crops (then a clean last epoch), and the weight EMA
    extra = [
        "--recipe",
        "improved",
        "--epochs",
        "3",
        "--batch-size",
        "128",
        "--seed",
        "7",
        "--deterministic",
        "--ema",
        ema,
        "--clean-epochs",
        "1",
    ]
    assert _train(syn, tmp_path / "a", *extra) == 0

    calls = {"n": 0}
    original = train.StopRequest.check

    def fake_check(self, d, device):  # as if Ctrl-C arrived during batch/epoch `stop_at`
        calls["n"] += 1
        return calls["n"] == stop_at

    monkeypatch.setattr(train.StopRequest, "check", fake_check)
    assert _train(syn, tmp_path / "b", *extra) == train.EXIT_INTERRUPTED
    monkeypatch.setattr(train.StopRequest, "check", original)
    interrupted = checkpoint.load(tmp_path / "b" / "checkpoint.pt")
    assert interrupted["epoch"] < 3
    assert _train(syn, tmp_path / "b", "--resume") == 0

    a, b = checkpoint.load(tmp_path / "a" / "checkpoint.pt"), checkpoint.load(tmp_path / "b" / "checkpoint.pt")
    assert a["epoch"] == b["epoch"] == 3
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["scheduler"] == b["scheduler"]
    if ema == "0":
        assert a["ema"] is None and b["ema"] is None
    else:
        assert a["ema"]["updates"] == b["ema"]["updates"] == 3 * 5  # 600 images / 128 -> 5 batches an epoch
        for k in a["ema"]["model"]:
            assert torch.equal(a["ema"]["model"][k], b["ema"]["model"][k]), k
    for x, y in zip(a["history"], b["history"]):
        for key in ("train_loss", "train_acc", "test_acc", "test_loss"):
            assert x[key] == pytest.approx(y[key], rel=1e-9, abs=1e-12), key


def test_ema_weights_are_evaluated_and_saved(syn, tmp_path):
    out = tmp_path / "ema"
    assert _train(syn, out, "--recipe", "improved", "--epochs", "2", "--ema", "0.9") == 0
    ckpt = checkpoint.load(out / "checkpoint.pt")
    assert ckpt["config"]["ema"] == 0.9 and ckpt["ema"]["decay"] == 0.9 and ckpt["ema"]["updates"] == 10
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert all(x["eval_weights"] == "ema" for x in lines) and summary["eval_weights"] == "ema"
    # the checkpoint's model is the EMA one, which differs from the raw training weights
    model = checkpoint.model_from(ckpt)
    assert torch.equal(model.state_dict()["fc1.weight"], ckpt["ema"]["model"]["fc1.weight"])
    assert not torch.equal(ckpt["ema"]["model"]["fc1.weight"], ckpt["model"]["fc1.weight"])
    assert not torch.equal(ckpt["ema"]["model"]["bn2.running_mean"], ckpt["model"]["bn2.running_mean"])
    ds = data.load(syn, verify=False, download=False, splits=("test",), progress=False)
    acc = (evaluate.predictions(model, ds.test.images) == ds.test.labels).double().mean().item()
    assert acc == pytest.approx(summary["test_acc"]) and acc == pytest.approx(lines[-1]["test_acc"])


def test_clean_epochs_turn_augmentation_off_at_the_end(syn, tmp_path, monkeypatch):
    seen = []
    original = train_epoch.plan_epoch

    def spy(n, gen, shuffle, crop_pad, flip, *a):
        seen.append((crop_pad, flip))
        return original(n, gen, shuffle, crop_pad, flip, *a)

    monkeypatch.setattr(train_epoch, "plan_epoch", spy)
    assert (
        _train(
            syn,
            tmp_path / "c",
            "--recipe",
            "improved",
            "--epochs",
            "3",
            "--crop-pad",
            "2",
            "--flip",
            "--clean-epochs",
            "2",
        )
        == 0
    )
    assert seen == [(2, True), (0, False), (0, False)]


def test_baseline_recipe_evaluates_raw_weights(syn, tmp_path):
    out = tmp_path / "raw"
    assert _train(syn, out, "--epochs", "1") == 0
    ckpt = checkpoint.load(out / "checkpoint.pt")
    assert ckpt["ema"] is None and ckpt["config"]["ema"] == 0.0
    assert json.loads((out / "summary.json").read_text())["eval_weights"] == "raw"


def test_weight_ema_update_rule():
    from torch import nn

    from fmnist_ext.train.ema import WeightEMA

    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = WeightEMA(net, 0.5)
    start = net[0].weight.detach().clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
        net[1].running_mean.fill_(3.0)
        net[1].num_batches_tracked.fill_(4)
    ema.update(net)  # t = 0: decay min(0.5, 1/10) = 0.1
    assert torch.allclose(ema.module[0].weight, start + 0.9)
    assert torch.allclose(ema.module[1].running_mean, torch.full((2,), 2.7))
    assert int(ema.module[1].num_batches_tracked) == 4
    ema.update(net)  # t = 1: decay min(0.5, 2/11)
    assert torch.allclose(ema.module[0].weight, start + 1 - 0.1 * 2 / 11)
    other = WeightEMA(net, 0.9)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.5 and other.updates == 2
    assert torch.equal(other.module[0].weight, ema.module[0].weight)
    with pytest.raises(ValueError):
        WeightEMA(net, 1.0)


def test_resume_differs_from_another_seed(syn, tmp_path):
    """The equality above can fail: a different seed gives different weights."""
    assert _train(syn, tmp_path / "a", "--epochs", "1", "--seed", "1") == 0
    assert _train(syn, tmp_path / "b", "--epochs", "1", "--seed", "2") == 0
    a, b = checkpoint.load(tmp_path / "a" / "checkpoint.pt"), checkpoint.load(tmp_path / "b" / "checkpoint.pt")
    assert not torch.equal(a["model"]["fc1.weight"], b["model"]["fc1.weight"])


# ------------------------------------------------------------------ recipe names


def test_baseline_is_the_default_recipe_and_unknown_names_are_refused(syn, tmp_path, capsys):
    # the default recipe is baseline
    assert train.RunConfig.from_args(train.command.build_parser().parse_args([])).recipe == "baseline"
    assert exit_code(train.main, ["--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "baseline:" in help_text
    assert _train(syn, tmp_path / "x", "--recipe", "seed") == 2
    assert "--recipe" in capsys.readouterr().err


def test_sweep_refuses_an_unknown_recipe_name():
    from fmnist_ext.train.sweep import parse_sweep

    assert parse_sweep(["recipe=baseline,improved"]) == [("recipe", ["baseline", "improved"])]
    with pytest.raises(argparse.ArgumentTypeError, match="recipe: expected one of baseline, improved, got 'seed'"):
        parse_sweep(["recipe=seed,improved"])


def test_run_config_round_trips_through_the_checkpoint_dict():
    from fmnist_ext.train.parser import build_parser

    config = train.RunConfig.from_args(build_parser().parse_args(["--recipe", "improved", "--seed", "3"]))
    saved = config.to_dict()
    assert train.RunConfig.from_checkpoint({**saved, "unknown_later_key": 1}) == config
    assert config.recipe == "improved" and config.seed == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 0.1


@pytest.mark.slow
def test_ctrl_c_saves_and_resume_finishes(syn, tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "fmnist_ext.train",
        "--data-dir",
        str(syn),
        *SYN,
        "--out",
        str(out),
        "--epochs",
        "30",
        "--batch-size",
        "50",
    ]
    proc = popen_with_sigint(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.time() + 180
    while not (out / "metrics.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == train.EXIT_INTERRUPTED, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    ck = checkpoint.load(out / "checkpoint.pt")
    assert 1 <= ck["epoch"] < 30
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert _train(syn, out, "--resume") == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == list(range(1, 31))
