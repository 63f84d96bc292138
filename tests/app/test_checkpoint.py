"""Checkpoint integrity and structure: every reader (checkpoint.load, and
through it evaluate, predict and train --resume) refuses a damaged or foreign
file with one line naming it."""

from __future__ import annotations

import hashlib
import io
import shutil
import struct
import zipfile

import pytest
import torch
from fmnist_app_helpers import exit_code, no_torchrun_env, write_dataset  # noqa: F401  (fixture)
from torch import nn

from fmnist_ext import checkpoint, evaluate, predict, train
from fmnist_ext.model import FashionCNN
from fmnist_ext.train.state import resume_problems, rng_state, set_rng_state

SYN = ["--no-verify", "--no-download", "--no-progress"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real one-epoch run on synthetic data: (data folder, run folder)."""
    root = tmp_path_factory.mktemp("ck")
    syn = write_dataset(root / "syn", n_train=300, n_test=100)
    out = root / "run"
    assert (
        exit_code(train.main, ["--data-dir", str(syn), *SYN, "--out", str(out), "--epochs", "1", "--batch-size", "100"])
        == 0
    )
    return syn, out


def _copy(trained, tmp_path) -> tuple:
    syn, out = trained
    run = tmp_path / "run"
    shutil.copytree(out, run)
    return syn, run, run / "checkpoint.pt"


def _flip(path, offset: int, bit: int = 0) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 1 << bit
    path.write_bytes(bytes(raw))


def _largest_member_data(path) -> int:
    """Offset of the largest zip member's data (a tensor), from its local header
    (whose extra field, torch's alignment padding, differs from the central directory's)."""
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    raw = path.read_bytes()
    h = info.header_offset
    assert raw[h : h + 4] == b"PK\x03\x04"
    name_len, extra_len = struct.unpack("<HH", raw[h + 26 : h + 30])
    return h + 30 + name_len + extra_len


def _one_line_error(capsys, *words):
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in err, err
    return err


def test_saved_file_is_still_a_plain_torch_checkpoint(trained):
    path = trained[1] / "checkpoint.pt"
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == checkpoint.FORMAT and raw["world_size"] == 1
    with zipfile.ZipFile(path) as z:
        assert z.comment.startswith(b"fmnist_ext sha256 ") and z.testzip() is None
    assert checkpoint.load(path, check=resume_problems)["epoch"] == 1


@pytest.mark.parametrize("where", [0.0, 0.001, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99, -70, -30, -1])
def test_any_flipped_bit_is_refused(trained, tmp_path, where):
    """Anywhere in the file: zip headers, the pickle, tensor data, the central directory, the hash itself."""
    _, _, path = _copy(trained, tmp_path)
    n = path.stat().st_size
    offset = int(where * n) if where >= 0 else n + int(where)
    for bit in (0, 5):
        _flip(path, offset, bit)
        with pytest.raises(checkpoint.CheckpointError, match=r"checkpoint\.pt: "):
            checkpoint.load(path)
        _flip(path, offset, bit)  # back
    checkpoint.load(path)


def test_flip_in_tensor_data_that_torch_load_accepts_is_refused(trained, tmp_path):
    """The case from the issue: torch.load reads the flipped file without complaint."""
    _, _, path = _copy(trained, tmp_path)
    _flip(path, _largest_member_data(path) + 8, 6)  # fc1.weight or its Adam state
    torch.load(path, weights_only=True)  # torch does not notice
    with pytest.raises(checkpoint.CheckpointError, match="damaged"):
        checkpoint.load(path)


def test_archive_without_our_hash_is_refused_and_its_crcs_are_checked_first(trained, tmp_path):
    ck = checkpoint.load(trained[1] / "checkpoint.pt")
    path = tmp_path / "foreign.pt"
    torch.save({**ck, "format": "someone_else/1"}, path)  # a torch.save'd dict, not one of ours
    with pytest.raises(checkpoint.CheckpointError, match="not an fmnist_ext checkpoint"):
        checkpoint.load(path)
    _flip(path, _largest_member_data(path) + 8, 6)
    with pytest.raises(checkpoint.CheckpointError, match="CRC"):
        checkpoint.load(path)


def test_current_format_without_its_hash_is_refused(trained, tmp_path):
    ck = checkpoint.load(trained[1] / "checkpoint.pt")
    path = tmp_path / "stripped.pt"
    torch.save(ck, path)  # format /2 but no trailer: the hash was cut off or rewritten
    with pytest.raises(checkpoint.CheckpointError, match="SHA-256 record"):
        checkpoint.load(path)


class Foreign:
    pass


def test_foreign_pickle_is_not_met_with_the_weights_only_hint(tmp_path):
    path = tmp_path / "obj.pt"
    torch.save({"x": Foreign()}, path)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load(path)
    msg = str(e.value)
    assert "not an fmnist_ext checkpoint" in msg and "weights_only" not in msg and "\n" not in msg


def _variant(trained, tmp_path, change) -> tuple:
    syn, run, path = _copy(trained, tmp_path)
    ck = checkpoint.load(path)
    change(ck)
    checkpoint.save(path, {k: v for k, v in ck.items() if k != "format"})
    return syn, run, path


def _other_architecture(ck):
    ck["model"] = nn.Sequential(nn.Linear(784, 10)).state_dict()


def _wrong_shape(ck):
    ck["model"]["fc1.weight"] = torch.zeros(120, 100)


def _missing_key(ck):
    del ck["model"]["bn2.running_var"]


def _ema_wrong(ck):
    ck["ema"] = {"decay": 0.9, "updates": 1, "model": {"conv1.weight": torch.zeros(6, 1, 5, 5)}}


def _not_a_dict(ck):
    ck["model"] = [1, 2, 3]


@pytest.mark.parametrize(
    "change, words",
    [
        (_other_architecture, ["another architecture", "missing conv1.weight", "unexpected 0.weight"]),
        (_wrong_shape, ["fc1.weight has shape [120, 100], expected [120, 192]"]),
        (_missing_key, ["missing bn2.running_var"]),
        (_ema_wrong, ["EMA weights", "missing"]),
        (_not_a_dict, ["not a state_dict"]),
    ],
)
def test_wrong_structure_is_named_by_every_reader(trained, tmp_path, capsys, change, words):
    syn, run, path = _variant(trained, tmp_path, change)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load(path)
    assert str(e.value).startswith(str(path)) and all(w in str(e.value) for w in words), e.value
    assert exit_code(evaluate.main, [str(path), "--data-dir", str(syn), "--no-verify", "--no-download"]) == 2
    _one_line_error(capsys, str(path), *words)
    assert exit_code(predict.main, [str(path), str(path)]) == 2
    _one_line_error(capsys, str(path), *words)
    assert exit_code(train.main, ["--data-dir", str(syn), *SYN, "--out", str(run), "--resume"]) == 2
    _one_line_error(capsys, "--resume", str(path), *words)


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("optimizer", None, ["optimizer"]),
        ("config", {"lr": 0.01}, ["setting 'recipe' missing"]),
        ("epoch", 7, ["epoch 7"]),
        ("rng", {"torch": 1}, ["rng"]),
        ("world_size", 0, ["world_size 0"]),
    ],
)
def test_training_state_checked_for_resume(trained, tmp_path, capsys, key, value, words):
    def change(ck):
        if value is None:
            del ck[key]
        else:
            ck[key] = value

    syn, run, path = _variant(trained, tmp_path, change)
    checkpoint.load(path)  # the weights are fine for evaluate/predict
    with pytest.raises(checkpoint.CheckpointError, match=r"resume|setting|epoch|rng|world_size"):
        checkpoint.load(path, check=resume_problems)
    assert exit_code(train.main, ["--data-dir", str(syn), *SYN, "--out", str(run), "--resume"]) == 2
    _one_line_error(capsys, "--resume", *words)


def test_bit_flipped_checkpoint_refused_by_evaluate_predict_and_resume(trained, tmp_path, capsys):
    syn, run, path = _copy(trained, tmp_path)
    _flip(path, path.stat().st_size // 2, 3)
    assert exit_code(evaluate.main, [str(path), "--data-dir", str(syn), "--no-verify", "--no-download"]) == 2
    _one_line_error(capsys, str(path), "damaged")
    assert exit_code(predict.main, [str(path), str(path)]) == 2
    _one_line_error(capsys, "damaged")
    assert exit_code(train.main, ["--data-dir", str(syn), *SYN, "--out", str(run), "--resume"]) == 2
    _one_line_error(capsys, "--resume", "damaged")


def test_folder_and_unreadable_paths(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="is a folder"):
        checkpoint.load(tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="no such checkpoint"):
        checkpoint.load(tmp_path / "missing.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(checkpoint.CheckpointError, match="not an fmnist_ext checkpoint"):
        checkpoint.load(tmp_path / "text.pt")
    buf = io.BytesIO()
    torch.save({"format": "something else"}, buf)
    (tmp_path / "other.pt").write_bytes(buf.getvalue())
    with pytest.raises(checkpoint.CheckpointError, match="not an fmnist_ext checkpoint"):
        checkpoint.load(tmp_path / "other.pt")


def test_huge_file_is_not_read(tmp_path, monkeypatch):
    big = tmp_path / "big.pt"
    with open(big, "wb") as f:
        f.truncate(checkpoint.MAX_BYTES + 1)  # sparse: no disk used
    monkeypatch.setattr(checkpoint.Path, "read_bytes", lambda self: pytest.fail("read into memory"))
    with pytest.raises(checkpoint.CheckpointError, match=r"big.pt: not an fmnist_ext checkpoint \(256 MiB"):
        checkpoint.load(big)


def test_run_state_round_trip_is_what_resume_checks(tmp_path):
    """RunState writes every field the resume check asks for, and restores what it wrote."""
    from fmnist_ext.train import RunConfig, RunState, recipes
    from fmnist_ext.train.state import RESUME_FIELDS

    config = RunConfig(recipe="improved", seed=5, kernels="stock", **{**recipes.RECIPES["improved"], "ema": 0.9})
    state = RunState.build(config, torch.device("cpu"), train_images=300, world_size=1)
    state.step, state.partial = 2, {"loss_sum": 1.5, "correct": 7, "seen": 256, "time": 0.25}
    torch.randn(3)  # move the global RNG past the state build
    path = tmp_path / "checkpoint.pt"
    state.save(path)
    ck = checkpoint.load(path, check=resume_problems)
    assert set(RESUME_FIELDS) <= set(ck) and ck["config"] == config.to_dict() and ck["step"] == 2

    other = RunState.build(config, torch.device("cpu"), train_images=300, world_size=1)
    other.restore(ck, path)
    assert (other.epoch, other.step, other.partial, other.history) == (0, 2, state.partial, [])
    assert torch.equal(other.epoch_start_rng, state.epoch_start_rng)
    assert torch.equal(torch.get_rng_state(), ck["rng"]["torch"])
    again = other.to_checkpoint()
    assert again["ema"]["decay"] == 0.9 and again["scheduler"] == ck["scheduler"]
    for k, v in ck["model"].items():
        assert torch.equal(again["model"][k], v), k

    ck["step"] = other.steps_per_epoch  # what only building the run can find
    with pytest.raises(checkpoint.CheckpointError, match=r"checkpoint\.pt: cannot resume from it \(step 3 is past"):
        other.restore(ck, path)


def _rezipped(src: bytes, extra: dict[str, bytes], hashed: bool) -> bytes:
    """The archive `src` with every member (and `extra`) DEFLATE-compressed, with the hash trailer if `hashed`."""
    buf = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(src)) as z, zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as out:
        prefix = z.namelist()[0].split("/")[0]
        for info in z.infolist():
            out.writestr(info.filename, z.read(info))
        for name, data in extra.items():
            out.writestr(f"{prefix}/{name}", data)
    raw = buf.getvalue()
    if not hashed:
        return raw
    body = raw[:-2] + struct.pack("<H", checkpoint._TRAILER_LEN)
    return body + checkpoint._TAG + hashlib.sha256(body).hexdigest().encode()


@pytest.mark.parametrize("hashed", [True, False], ids=["hashed", "unhashed"])
@pytest.mark.parametrize("bomb", [False, True], ids=["deflated", "deflate-bomb"])
def test_compressed_members_are_refused_before_anything_expands(trained, tmp_path, capsys, hashed, bomb):
    # a 1 MB file with a valid hash whose DEFLATE member expanded to 1 GiB inside torch.load
    ck = checkpoint.load(trained[1] / "checkpoint.pt")
    src = checkpoint.to_bytes(ck) if hashed else _torch_saved(ck)
    path = tmp_path / "packed.pt"
    path.write_bytes(_rezipped(src, {"data/bomb": bytes(64 * 2**20)} if bomb else {}, hashed))
    assert path.stat().st_size < 2 * 2**20
    with pytest.raises(checkpoint.CheckpointError, match="compressed zip member"):
        checkpoint.load(path)
    assert exit_code(evaluate.main, [str(path), "--data-dir", str(trained[0]), *SYN[:2]]) == 2
    _one_line_error(capsys, "argument checkpoint", "compressed zip member")


def _torch_saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_members_claiming_more_bytes_than_the_file_are_refused(trained, tmp_path):
    raw = bytearray(checkpoint.to_bytes(checkpoint.load(trained[1] / "checkpoint.pt")))
    with zipfile.ZipFile(io.BytesIO(bytes(raw))) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    # the central directory's entry of that member: sizes set to 1 GiB, both (still "stored")
    entry = raw.index(b"PK\x01\x02")
    while struct.unpack("<I", raw[entry + 42 : entry + 46])[0] != info.header_offset:
        entry = raw.index(b"PK\x01\x02", entry + 4)
    raw[entry + 20 : entry + 28] = struct.pack("<II", 2**30, 2**30)
    body = bytes(raw[: -checkpoint._TRAILER_LEN])  # and a valid hash, as a crafted file has
    path = tmp_path / "sizes.pt"
    path.write_bytes(body + checkpoint._TAG + hashlib.sha256(body).hexdigest().encode())
    with pytest.raises(checkpoint.CheckpointError, match=r"members claim \d+ bytes"):
        checkpoint.load(path)


def test_checkpoint_round_trip_loads_weights_only(tmp_path):
    torch.manual_seed(1)
    m = FashionCNN("fused")
    opt = torch.optim.AdamW(m.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=10)
    x = torch.randn(8, 1, 28, 28)
    m(x).sum().backward()
    opt.step()
    sched.step()
    gen = torch.Generator().manual_seed(3)
    path = tmp_path / "ck.pt"
    checkpoint.save(
        path,
        {
            "model": m.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "rng": rng_state(gen),
            "epoch": 1,
            "step": 0,
            "config": {"lr": 0.01},
            "kernels": "fused",
        },
    )
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temp file left
    raw = torch.load(path, weights_only=True)  # loadable the strict way
    assert raw["epoch"] == 1 and raw["config"] == {"lr": 0.01}
    ck = checkpoint.load(path)
    for kernels in ("fused", "stock"):
        m2 = checkpoint.model_from(ck, kernels)
        assert m2.kernels == kernels
        m.eval()
        torch.testing.assert_close(m2(x), m(x), rtol=1e-5, atol=1e-5)
    gen2 = torch.Generator()
    set_rng_state(ck["rng"], gen2)
    assert torch.equal(torch.randperm(50, generator=gen2), torch.randperm(50, generator=gen))
    opt2 = torch.optim.AdamW(FashionCNN().parameters(), lr=0.01)
    opt2.load_state_dict(ck["optimizer"])


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, None])
def test_bad_checkpoint_refused(tmp_path, content):
    path = tmp_path / "ck.pt"
    if content is None:
        torch.save({"something": 1}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(checkpoint.CheckpointError, match=r"ck\.pt"):
        checkpoint.load(path)
    with pytest.raises(checkpoint.CheckpointError, match="no such"):
        checkpoint.load(tmp_path / "missing.pt")
