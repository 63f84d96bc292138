"""The command-line tools: help, errors, run folders, sweeps, torchrun, and a
1-epoch run on the real data with evaluate/predict/viz. Resume, EMA, clean
epochs and the recipe's old name are in test_train_resume.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from fmnist_app_helpers import real_data_dir, write_dataset

from fmnist_ext import checkpoint, data, evaluate, predict, train, viz

SYN = ["--no-verify", "--no-download", "--no-progress"]


@pytest.fixture
def syn(tmp_path):
    return write_dataset(tmp_path / "syn", n_train=600, n_test=200)


@pytest.fixture(autouse=True)
def _no_torchrun_env(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)


def _exit_code(fn, argv) -> int:
    try:
        return fn(argv)
    except SystemExit as e:
        return e.code


def _env():
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    return env


# ------------------------------------------------------------------ help and errors


@pytest.mark.parametrize(
    "module, words",
    [
        (train, ["--recipe", "--kernels", "--resume", "--sweep", "--tensorboard", "--data-dir", "improved", "--ema"]),
        (evaluate, ["checkpoint", "--kernels", "--data-dir"]),
        (predict, ["IMAGE", "--invert", "--top"]),
        (viz, ["sprite", "curves"]),
    ],
)
def test_help(module, words, capsys):
    assert _exit_code(module.main, ["--help"]) == 0
    out = capsys.readouterr().out
    for w in words:
        assert w in out


def test_help_as_module_subprocess():
    r = subprocess.run(
        [sys.executable, "-m", "fmnist_ext.train", "--help"], capture_output=True, text=True, timeout=120, env=_env()
    )
    assert r.returncode == 0 and "usage: python -m fmnist_ext.train" in r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line_exit_2(syn, tmp_path, capsys):
    assert _exit_code(train.main, ["--device", "cuda", "--data-dir", str(syn), *SYN, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device" in err[0] and "CUDA" in err[0]
    assert "Traceback" not in "".join(err)


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--lr", "-1"], ["--lr", "positive"]),
        (["--batch-size", "0"], ["--batch-size"]),
        (["--label-smoothing", "1.5"], ["--label-smoothing"]),
        (["--sweep", "foo=1"], ["--sweep", "unknown key 'foo'"]),
        (["--sweep", "lr=abc"], ["--sweep", "lr"]),
        (["--sweep", "lr"], ["--sweep", "KEY=V1,V2"]),
        (["--resume"], ["--resume", "no such checkpoint"]),
        (["--kernels", "cuda"], ["--kernels"]),
    ],
)
def test_bad_arguments_exit_2_naming_the_argument(argv, words, syn, tmp_path, capsys):
    assert _exit_code(train.main, [*argv, "--data-dir", str(syn), *SYN, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for w in words:
        assert w in err


def test_tensorboard_missing_is_a_clear_error(syn, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    assert _exit_code(train.main, ["--tensorboard", "--data-dir", str(syn), *SYN, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--tensorboard" in err and "pip install tensorboard" in err and "Traceback" not in err


def test_tensorboard_logs_what_the_seed_logged(syn, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    assert _train(syn, out, "--epochs", "2", "--tensorboard") == 0
    ea = EventAccumulator(str(out / "tensorboard"), size_guidance={"histograms": 0, "images": 0})
    ea.Reload()
    tags = ea.Tags()
    assert {"Loss", "Number Correct", "Accuracy"} <= set(tags["scalars"])
    assert len(ea.Scalars("Loss")) == 2
    assert "conv1.weight" in tags["histograms"] and "conv1.weight.grad" in tags["histograms"]
    assert tags["images"] and tags["graph"]


def test_no_data_lists_places_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    monkeypatch.setattr(data.dataset, "SYSTEM_DIRS", (tmp_path / "system",))
    monkeypatch.setenv(data.MIRROR_ENV, "http://127.0.0.1:9/")
    assert _exit_code(train.main, ["--no-progress", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "Places tried" in err and "apt-get install dataset-fashion-mnist" in err and "Traceback" not in err


def test_bad_files_refused_by_cli(syn, tmp_path, capsys):
    (syn / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8bnot really gzip")
    assert _exit_code(train.main, ["--data-dir", str(syn), *SYN, "--out", str(tmp_path / "o")]) == 2
    assert "train-labels-idx1-ubyte.gz: corrupt or truncated gzip" in capsys.readouterr().err


# ------------------------------------------------------------------ training on synthetic data


def _train(syn, out, *extra):
    return _exit_code(train.main, ["--data-dir", str(syn), *SYN, "--out", str(out), *extra])


def test_run_folder_contents_and_refusal_to_overwrite(syn, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(syn, out, "--epochs", "2", "--batch-size", "100") == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["checkpoint.pt", "confusion.png", "curves.png", "metrics.jsonl", "summary.json"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2]
    for key in ("train_loss", "train_acc", "test_acc", "epoch_time_s", "images_per_s"):
        assert key in lines[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_acc"] == pytest.approx(lines[-1]["test_acc"])
    assert sum(map(sum, summary["confusion_matrix"])) == 200
    assert (out / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "confusion matrix" in printed and "Ankle boot" in printed
    # a second run into the same folder is refused
    assert _train(syn, out, "--epochs", "2") == 2
    assert "--resume" in capsys.readouterr().err
    # resuming a finished run with a different setting is refused
    assert _train(syn, out, "--resume", "--lr", "0.5") == 2
    assert "--lr 0.5" in capsys.readouterr().err
    assert _train(syn, out, "--resume", "--kernels", "stock", "--seed", "0") == 2
    err = capsys.readouterr().err
    assert "--kernels stock (checkpoint: fused)" in err and "--seed" not in err


def test_sweep_table_and_csv(syn, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert _train(syn, out, "--epochs", "1", "--sweep", "lr=0.01,0.001", "batch_size=100,300") == 0
    rows = (out / "sweep.csv").read_text().splitlines()
    assert rows[0].startswith("lr,batch_size,test_acc")
    assert len(rows) == 5
    accs = [float(r.split(",")[2]) for r in rows[1:]]
    assert accs == sorted(accs, reverse=True)
    assert "| lr | batch_size | test_acc |" in capsys.readouterr().out
    assert len([p for p in out.iterdir() if p.is_dir()]) == 4


@pytest.mark.slow
def test_torchrun_two_cpu_processes(syn, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "fmnist_ext.train",
        "--data-dir",
        str(syn),
        *SYN,
        "--out",
        str(out),
        "--device",
        "cpu",
        "--epochs",
        "1",
        "--batch-size",
        "100",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("epoch   1/1") == 1  # only rank 0 prints
    assert "x 2 processes" in r.stdout
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec["train_correct"] <= 600 and 0 <= rec["test_acc"] <= 1
    ck = checkpoint.load(out / "checkpoint.pt")
    assert ck["epoch"] == 1 and "module.conv1.weight" not in ck["model"]


# ------------------------------------------------------------------ the real data


@pytest.mark.slow
def test_one_epoch_on_real_data_then_evaluate_predict_viz(tmp_path, capsys):
    folder = real_data_dir()
    out = tmp_path / "real"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fmnist_ext.train",
            "--data-dir",
            str(folder),
            "--no-download",
            "--no-progress",
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=_env(),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_acc"] >= 0.80

    assert evaluate.main([str(out / "checkpoint.pt"), "--data-dir", str(folder), "--json", "--kernels", "stock"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["test_accuracy"] == pytest.approx(summary["test_acc"], abs=1e-3)
    assert sum(map(sum, ev["confusion_matrix"])) == 10000

    from PIL import Image

    ds = data.load(folder, download=False, splits=("test",), progress=False)
    files = []
    for i in range(20):
        im = Image.fromarray(ds.test.images[i].numpy(), mode="L")
        if i % 2:  # a dark-on-light, larger JPEG: inverted and resized back
            im = Image.fromarray(255 - ds.test.images[i].numpy(), mode="L").resize((56, 56))
        f = tmp_path / f"img{i}.{'jpg' if i % 2 else 'png'}"
        im.save(f)
        files.append(str(f))
    assert predict.main([str(out / "checkpoint.pt"), *files, "--json"]) == 0
    preds = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(preds) == 20 and all(len(p["top"]) == 3 for p in preds)
    hits = sum(data.CLASSES.index(p["top"][0]["class"]) == int(ds.test.labels[i]) for i, p in enumerate(preds))
    assert hits >= 12

    sprite = tmp_path / "sprite.png"
    assert viz.main(["sprite", "--data-dir", str(folder), "--out", str(sprite)]) == 0
    with Image.open(sprite) as im:
        assert im.size[1] >= 30 * 28 // 2


def test_predict_and_evaluate_errors(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"nope")
    assert _exit_code(evaluate.main, [str(bad)]) == 2
    assert "bad.pt: not an fmnist_ext checkpoint" in capsys.readouterr().err
    assert _exit_code(predict.main, [str(bad), "x.png"]) == 2
    assert "argument checkpoint" in capsys.readouterr().err
