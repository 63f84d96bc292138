"""predict: EXIF orientation, 16-bit images, decompression bombs and unreadable files
(one line naming the file), a closed stdout pipe without a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_helpers import assert_quiet, closed_pipe_run, one_error_line, untrained_checkpoint
from fmnist_app_helpers import exit_code

from fmnist_ext import checkpoint, predict


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return untrained_checkpoint(tmp_path_factory.mktemp("ck") / "checkpoint.pt")


def test_predict_into_a_closed_pipe(ckpt, tmp_path):
    from PIL import Image

    img = tmp_path / "a.png"
    Image.new("L", (28, 28), 30).save(img)
    rc, err = closed_pipe_run(["-m", "fmnist_ext.predict", str(ckpt), str(img), str(img)])
    assert rc == 141, (rc, err)
    assert_quiet(err)


def test_predict_checkpoint_of_another_shape_is_one_line(tmp_path, capsys):
    bad = tmp_path / "other.pt"
    checkpoint.save(bad, {"model": {"conv1.weight": torch.zeros(3)}, "kernels": "fused"})
    assert exit_code(predict.main, [str(bad), "x.png"]) == 2
    line = one_error_line(capsys)
    assert f"argument checkpoint: {bad}: " in line and "not the FashionCNN's" in line
    assert "conv1.weight has shape [3]" in line


def _pattern() -> torch.Tensor:
    """An asymmetric 28x28 picture: a bright L in the top-left corner."""
    t = torch.zeros(28, 28, dtype=torch.uint8)
    t[2:20, 3:6] = 250
    t[17:20, 3:15] = 180
    return t


def test_predict_applies_exif_orientation(tmp_path):
    from PIL import Image

    stored = _pattern()
    path = tmp_path / "rotated.png"
    im = Image.fromarray(stored.numpy(), mode="L")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored picture must be turned 90 degrees clockwise to be upright
    im.save(path, exif=exif)
    got = predict.load_image(str(path), invert="no")
    assert torch.equal(got, torch.rot90(stored, -1)), "EXIF orientation ignored"
    plain = tmp_path / "plain.png"
    im.save(plain)
    assert torch.equal(predict.load_image(str(plain), invert="no"), stored)


def test_predict_scales_16_bit_images(tmp_path):
    import numpy as np
    from PIL import Image

    levels = np.linspace(0, 65535, 28 * 28).round().astype(np.uint16).reshape(28, 28)
    path = tmp_path / "deep.png"
    Image.fromarray(levels).save(path)  # a 16-bit grayscale PNG
    with Image.open(path) as im:
        assert im.mode in ("I;16", "I"), im.mode
    got = predict.load_image(str(path), invert="no")
    want = torch.from_numpy(np.rint(levels / 65535 * 255).astype(np.uint8))
    assert int((got.int() - want.int()).abs().max()) <= 1
    assert len(torch.unique(got)) > 200  # grey levels, not black and white


@pytest.mark.parametrize("side", [40, 100])  # over the limit (Pillow warns) and over twice it (Pillow refuses)
def test_predict_decompression_bomb_is_one_line(ckpt, tmp_path, monkeypatch, capsys, side):
    from PIL import Image

    path = tmp_path / "huge.png"
    Image.new("L", (side, side), 0).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # instead of writing an 89-megapixel file
    assert exit_code(predict.main, [str(ckpt), str(path)]) == 2
    line = one_error_line(capsys)
    assert f"argument IMAGE: {path}: too many pixels" in line and "1000" in line


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda p: p.write_text("hello"), "not an image Pillow can read"),
        (lambda p: p.mkdir(), "is a folder"),
        (lambda p: None, "no such file"),
        (lambda p: _truncated_png(p), "cannot read image"),
    ],
)
def test_predict_unreadable_images_are_one_line(ckpt, tmp_path, capsys, make, words):
    path = tmp_path / "img.png"
    make(path)
    assert exit_code(predict.main, [str(ckpt), str(path)]) == 2
    line = one_error_line(capsys)
    assert f"argument IMAGE: {path}: {words}" in line


def _truncated_png(path: Path) -> None:
    from PIL import Image

    Image.fromarray(torch.randint(0, 255, (64, 64), dtype=torch.uint8).numpy(), mode="L").save(path)
    path.write_bytes(path.read_bytes()[:200])


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: __import__("PIL.Image").Image.new("F", (28, 28), 0.5), "32-bit float images are not supported"),
        (
            lambda: __import__("PIL.Image").Image.new("I", (28, 28), 70000),
            "32-bit integer images are not supported",
        ),
        # an int32 image within 0-255 was scaled as 16-bit (a black picture)
        (lambda: __import__("PIL.Image").Image.new("I", (28, 28), 200), "32-bit integer images are not supported"),
    ],
)
def test_predict_refuses_modes_it_cannot_scale(ckpt, tmp_path, capsys, make, words):
    # Converting these to 8 bits would mean guessing their range: Pillow clips them (a black image).
    path = tmp_path / "deep.tif"
    make().save(path)
    assert exit_code(predict.main, [str(ckpt), str(path)]) == 2
    assert f"argument IMAGE: {path}: {words}" in one_error_line(capsys)
