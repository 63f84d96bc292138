"""viz: malformed or incomplete metrics.jsonl, unwritable or unknown-format --out: one
line naming the file, before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import NO_NET, one_error_line
from fmnist_app_helpers import exit_code, write_dataset

from fmnist_ext import data, viz


def _run_dir(tmp_path: Path, text: str | bytes) -> Path:
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    f = run / "metrics.jsonl"
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    return run


GOOD = json.dumps({"epoch": 1, "train_loss": 0.5, "test_loss": 0.6, "train_acc": 0.8, "test_acc": 0.79})


@pytest.mark.parametrize(
    "text, words",
    [
        (GOOD + "\n" + GOOD[:30], "line 2: not JSON"),
        (GOOD + "\n" + json.dumps({"epoch": 2, "train_loss": 0.4}), "line 2: missing or not a number: test_loss"),
        (json.dumps({**json.loads(GOOD), "test_acc": "high"}), "line 1: missing or not a number: test_acc"),
        ("[1, 2]", "line 1: expected a JSON object"),
        ("\n", "no epochs recorded"),
        (b"\xff\xfe" + GOOD.encode(), "cannot read"),
    ],
)
def test_viz_curves_bad_metrics_is_one_line(tmp_path, capsys, text, words):
    run = _run_dir(tmp_path, text)
    assert exit_code(viz.main, ["curves", str(run)]) == 2
    line = one_error_line(capsys)
    assert f"{run / 'metrics.jsonl'}: {words}" in line
    assert not (run / "curves.png").exists()


def test_viz_curves_draws_good_metrics(tmp_path, capsys):
    run = _run_dir(tmp_path, GOOD + "\n" + GOOD.replace('"epoch": 1', '"epoch": 2') + "\n")
    assert viz.main(["curves", str(run)]) == 0
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "out, words",
    [
        (lambda t: t / "adir", "is a folder"),
        (lambda t: t / "afile" / "c.png", "is not a folder"),
        (lambda t: t / "c.weird", "unknown image format 'weird'"),
    ],
)
def test_viz_curves_bad_out_is_one_line(tmp_path, capsys, out, words):
    run = _run_dir(tmp_path, GOOD)
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    target = out(tmp_path)
    assert exit_code(viz.main, ["curves", str(run), "--out", str(target)]) == 2
    line = one_error_line(capsys)
    assert line.split(": error: ")[1].startswith("argument --out") and words in line, line


def test_viz_sprite_weird_extension_blames_the_format_before_loading(tmp_path, monkeypatch, capsys):
    def no_load(*a, **k):
        raise AssertionError("data loaded before --out was checked")

    monkeypatch.setattr(data, "load", no_load)
    assert exit_code(viz.main, ["sprite", "--out", str(tmp_path / "x.weird")]) == 2
    line = one_error_line(capsys)
    assert "argument --out" in line and "unknown image format 'weird'" in line and "--rows" not in line


def test_viz_sprite_too_many_rows_blames_rows(tmp_path, capsys):
    folder = write_dataset(tmp_path / "d", n_train=100, n_test=10)
    out = tmp_path / "s.png"
    assert exit_code(viz.main, ["sprite", "--data-dir", str(folder), *NO_NET, "--out", str(out), "--rows", "50"]) == 2
    assert "argument --rows/--columns" in capsys.readouterr().err
    assert not out.exists()
    assert (
        viz.main(["sprite", "--data-dir", str(folder), *NO_NET, "--out", str(out), "--rows", "1", "--columns", "2"])
        == 0
    )
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_viz_ctrl_c_while_loading_is_one_line(tmp_path, monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "load", interrupted)
    out = tmp_path / "s.png"
    assert viz.main(["sprite", "--out", str(out)]) == 130
    assert one_error_line(capsys).endswith("fmnist_ext.viz: interrupted")
    assert not out.exists()
