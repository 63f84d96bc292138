"""IDX reading and checking, the lookup order, the atomic download, the real
files: the data layer (data.py, idx.py, download.py) in one file,
slightly over 400 lines, since its tests share the synthetic-file fixtures."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import struct
import threading
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from fmnist_app_helpers import real_data_dir, synthetic, write_dataset, write_idx

from fmnist_ext import data
from fmnist_ext.data import download, idx


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No real data visible: empty cache, no FMNIST_DATA, no system folder, no mirror."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    monkeypatch.setattr(data.dataset, "SYSTEM_DIRS", (tmp_path / "system",))
    monkeypatch.setenv(data.MIRROR_ENV, "http://127.0.0.1:9/")  # discard port: nothing listens
    return tmp_path


# ------------------------------------------------------------------ IDX files


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, suffix):
    images, labels = synthetic(37)
    write_idx(tmp_path / f"img{suffix}", images)
    write_idx(tmp_path / f"lab{suffix}", labels)
    assert (tmp_path / f"img{suffix}").read_bytes()[:2] == (b"\x1f\x8b" if suffix else b"\x00\x00")
    got_i = idx.read_idx(tmp_path / f"img{suffix}", "images")
    got_l = idx.read_idx(tmp_path / f"lab{suffix}", "labels")
    assert got_i.dtype == torch.uint8 and got_i.shape == (37, 28, 28)
    assert torch.equal(got_i, images) and torch.equal(got_l, labels)


def test_gzip_detected_by_content_not_name(tmp_path):
    images, _ = synthetic(3)
    write_idx(tmp_path / "noext", images, compress=True)
    assert torch.equal(idx.read_idx(tmp_path / "noext", "images"), images)


def _images_bytes(n=4, rows=28, cols=28, magic=idx.IMAGES_MAGIC, extra=0):
    return struct.pack(">IIII", magic, n, rows, cols) + bytes(n * rows * cols + extra)


@pytest.mark.parametrize(
    "payload, kind, message",
    [
        (_images_bytes(magic=0x00000801), "images", "wrong magic"),
        (struct.pack(">II", idx.IMAGES_MAGIC, 4), "labels", "wrong magic"),
        (_images_bytes()[:-1], "images", "truncated"),
        (_images_bytes()[:10], "images", "truncated header"),
        (_images_bytes(extra=5), "images", "unexpected bytes"),
        (_images_bytes(rows=27), "images", "27x28"),
        (struct.pack(">II", idx.LABELS_MAGIC, 3) + bytes([1, 10, 2]), "labels", "label 10 at index 1"),
        (struct.pack(">II", idx.LABELS_MAGIC, 3) + bytes([1, 2]), "labels", "truncated"),
        (b"\x00\x00", "labels", "too short"),
    ],
)
def test_bad_idx_refused_naming_file(tmp_path, payload, kind, message):
    path = tmp_path / "bad-file"
    path.write_bytes(payload)
    with pytest.raises(data.DataError, match=message) as e:
        idx.read_idx(path, kind)
    assert str(path) in str(e.value)
    # the same inside a gzip
    gz = tmp_path / "bad-file.gz"
    gz.write_bytes(gzip.compress(payload))
    with pytest.raises(data.DataError, match=message):
        idx.read_idx(gz, kind)


def test_truncated_gzip_refused(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(_images_bytes())[:-20])
    with pytest.raises(data.DataError, match="corrupt or truncated gzip"):
        idx.read_idx(path, "images")


def test_count_mismatch_between_images_and_labels(tmp_path):
    write_dataset(tmp_path, n_train=50, n_test=20)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", synthetic(19)[1])
    paths, missing = idx.files_in(tmp_path)
    assert not missing
    with pytest.raises(data.DataError, match=r"20 images but .* 19 labels"):
        data.load_split(paths, "test", verify=False)


def test_checksum_verification_on_decompressed_bytes(tmp_path):
    write_dataset(tmp_path, n_train=50, n_test=20)
    paths, _ = idx.files_in(tmp_path)
    with pytest.raises(data.DataError, match=r"train-images-idx3-ubyte.gz: .*47040016"):
        data.load_split(paths, "train", verify=True)
    # right size, wrong content -> checksum mismatch
    f = idx.IdxFile("x", "x", "labels", "", hashlib.md5(b"other").hexdigest(), 28, 20)
    lab = tmp_path / "lab"
    write_idx(lab, synthetic(20)[1])
    with pytest.raises(data.DataError, match="checksum mismatch"):
        idx.read_idx(lab, "labels", verify=f)
    good = idx.IdxFile("x", "x", "labels", "", hashlib.md5(lab.read_bytes()).hexdigest(), 28, 20)
    assert idx.read_idx(lab, "labels", verify=good).shape == (20,)


# ------------------------------------------------------------------ lookup order


def test_lookup_order(isolated, monkeypatch):
    tmp = isolated
    system = write_dataset(tmp / "system", seed=1)
    assert data.locate().paths["train-images"].parent == system
    cache = write_dataset(data.cache_dir(), seed=2)
    assert data.locate().paths["train-images"].parent == cache
    env = write_dataset(tmp / "env", seed=3, gz=False)
    monkeypatch.setenv(data.DATA_ENV, str(env))
    assert data.locate().paths["train-images"] == env / "train-images-idx3-ubyte"
    explicit = write_dataset(tmp / "explicit", seed=4)
    assert data.locate(explicit).paths["t10k-labels"].parent == explicit


def test_torchvision_layout(isolated):
    root = isolated / "tv"
    raw = write_dataset(root / "FashionMNIST" / "raw")
    assert data.locate(root).paths["train-labels"].parent == raw


def test_explicit_data_dir_must_hold_the_files(isolated):
    write_dataset(isolated / "system")
    (isolated / "half").mkdir()
    write_dataset(isolated / "half")
    (isolated / "half" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(data.DataError, match=r"(?s)--data-dir .*half.*missing t10k-labels"):
        data.locate(isolated / "half")


def test_nothing_found_lists_places_tried(isolated):
    with pytest.raises(data.DataError) as e:
        data.locate(progress=False)
    msg = str(e.value)
    for part in (
        "Places tried",
        "user cache",
        "Debian dataset-fashion-mnist",
        "download from http://127.0.0.1:9/",
        "apt-get install dataset-fashion-mnist",
        "--data-dir",
    ):
        assert part in msg, part
    assert not any(data.cache_dir().glob("*")) if data.cache_dir().exists() else True
    with pytest.raises(data.DataError, match="download: disabled"):
        data.locate(download=False)


# ------------------------------------------------------------------ download


class _Handler(http.server.BaseHTTPRequestHandler):
    files: ClassVar[dict[str, bytes]] = {}

    def do_GET(self):
        body = self.files.get(self.path.split("/")[-1])
        if body is None:
            self.send_error(404)
            return
        broken = self.path.startswith("/broken/")
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if broken else body)
        if broken:
            self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    src = write_dataset(tmp_path / "served")
    files = {p.name: p.read_bytes() for p in src.iterdir()}
    handler = type("H", (_Handler,), {"files": files})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", files
    finally:
        httpd.shutdown()
        httpd.server_close()
        t.join(5)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_download_all_atomic_and_checked(server, tmp_path):
    base, files = server
    md5s = {k: hashlib.md5(files[f.name + ".gz"]).hexdigest() for k, f in idx.FILES.items()}
    dest = tmp_path / "dl"
    paths = download.download_all(dest, base + "/ok/", md5s=md5s, progress=False)
    assert _leftovers(dest) == sorted(f.name + ".gz" for f in idx.FILES.values())
    assert all(paths[k].read_bytes() == files[f.name + ".gz"] for k, f in idx.FILES.items())
    ds = data.load_split(paths, "train", verify=False)
    assert len(ds) == 600


def test_download_broken_off_leaves_nothing(server, tmp_path):
    base, _ = server
    dest = tmp_path / "dl"
    with pytest.raises(data.DataError, match=r"broke off|transfer failed|IncompleteRead"):
        download.download_file(
            base + "/broken/train-images-idx3-ubyte.gz", dest / "train-images-idx3-ubyte.gz", progress=False
        )
    assert _leftovers(dest) == []


def test_download_md5_mismatch_and_404_leave_nothing(server, tmp_path):
    base, _ = server
    dest = tmp_path / "dl"
    with pytest.raises(data.DataError, match="checksum mismatch"):
        download.download_file(base + "/ok/train-labels-idx1-ubyte.gz", dest / "l.gz", md5="0" * 32, progress=False)
    with pytest.raises(data.DataError, match=r"404|Not Found"):
        download.download_file(base + "/ok/nothing.gz", dest / "n.gz", progress=False)
    assert _leftovers(dest) == []


def test_locate_downloads_into_cache_and_checks_official_md5(server, isolated):
    base, _ = server
    # The served files are not the official ones: the official gz MD5 refuses them.
    with pytest.raises(data.DataError, match="checksum mismatch") as e:
        data.locate(mirror=base + "/ok/", progress=False)
    assert "Places tried" in str(e.value)
    assert _leftovers(data.cache_dir()) == []


# ------------------------------------------------------------------ the real files


def test_real_data_verified_and_normalisation_constants():
    folder = real_data_dir()
    ds = data.load(folder, verify=True, download=False, progress=False)
    assert ds.train.images.shape == (60000, 28, 28) and ds.test.images.shape == (10000, 28, 28)
    assert ds.train.images.dtype == torch.uint8
    assert torch.equal(torch.bincount(ds.train.labels), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(ds.test.labels), torch.full((10,), 1000))
    x = ds.train.images.double() / 255
    assert abs(x.mean().item() - data.MEAN) < 5e-4 and abs(x.std().item() - data.STD) < 5e-4


# ------------------------------------------------------------------ explicit choices never fall back


def _one_line(msg: str) -> str:
    assert "\n" not in msg, msg
    return msg


@pytest.mark.parametrize(
    "kind, state",
    [("file", "not a folder"), ("missing", "does not exist"), ("partial", "missing t10k-images-idx3-ubyte[.gz]")],
)
def test_bad_fmnist_data_is_an_error_not_a_fallback(isolated, monkeypatch, kind, state):
    write_dataset(isolated / "system")  # a complete copy the lookup must NOT silently take instead
    bad = isolated / "chosen"
    if kind == "file":
        bad.write_text("not a folder")
    elif kind == "partial":
        write_dataset(bad)
        (bad / "t10k-images-idx3-ubyte.gz").unlink()
    monkeypatch.setenv(data.DATA_ENV, str(bad))
    with pytest.raises(data.DataError) as e:
        data.locate()
    msg = _one_line(str(e.value))
    assert msg.startswith(f"{data.DATA_ENV}={bad}: {state}"), msg
    # --data-dir with the same path: the same one-line error, naming --data-dir
    monkeypatch.delenv(data.DATA_ENV)
    with pytest.raises(data.DataError) as e:
        data.locate(bad)
    assert _one_line(str(e.value)).startswith(f"--data-dir {bad}: {state}"), str(e.value)


def test_incomplete_torchvision_layout_is_named(isolated):
    raw = write_dataset(isolated / "tv" / "FashionMNIST" / "raw")
    (raw / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(data.DataError) as e:
        data.locate(isolated / "tv")
    assert _one_line(str(e.value)) == (
        f"--data-dir {isolated / 'tv'}: missing train-labels-idx1-ubyte[.gz] in its torchvision layout {raw}"
    )


def test_empty_fmnist_data_means_unset_and_empty_data_dir_is_refused(isolated, monkeypatch):
    system = write_dataset(isolated / "system")
    monkeypatch.setenv(data.DATA_ENV, "")
    assert data.locate().paths["train-images"].parent == system
    with pytest.raises(data.DataError, match="--data-dir: empty path"):
        data.locate("")


def test_load_says_which_folder_it_used(isolated, monkeypatch):
    system = write_dataset(isolated / "system")
    ds = data.load(verify=False, download=False, splits=("test",), progress=False)
    assert (ds.folder, ds.source) == (system, "Debian dataset-fashion-mnist")
    assert ds.describe() == f"data: {system} (from Debian dataset-fashion-mnist)"
    env = write_dataset(isolated / "env")
    monkeypatch.setenv(data.DATA_ENV, str(env))
    ds = data.load(verify=False, download=False, progress=False)
    assert (ds.folder, ds.source) == (env, data.DATA_ENV) and len(ds.train) == 600


def _test_files_only(folder: Path) -> Path:
    write_dataset(folder)
    for key in idx.SPLITS["train"]:
        (folder / (idx.FILES[key].name + ".gz")).unlink()
    return folder


def test_test_split_needs_only_the_test_files(isolated, monkeypatch):
    only_test = _test_files_only(isolated / "t10k-only")
    ds = data.load(only_test, verify=False, download=False, splits=("test",), progress=False)
    assert ds.train is None and len(ds.test) == 200 and ds.folder == only_test
    monkeypatch.setenv(data.DATA_ENV, str(only_test))
    assert set(data.locate(splits=("test",)).paths) == {"t10k-images", "t10k-labels"}
    # ... but training still needs the training files, and says which
    for splits in (("train", "test"), ("train",)):
        with pytest.raises(data.DataError) as e:
            data.locate(splits=splits)
        assert _one_line(str(e.value)) == (
            f"{data.DATA_ENV}={only_test}: missing train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz]"
        )
    # the same for a folder found without being named (the system copy)
    monkeypatch.delenv(data.DATA_ENV)
    _test_files_only(isolated / "system")
    assert data.locate(splits=("test",), download=False).paths["t10k-images"].parent == isolated / "system"


def test_unknown_or_no_split_is_refused():
    with pytest.raises(ValueError, match="split must be one of"):
        idx.keys_for(("validation",))
    with pytest.raises(ValueError, match="at least one"):
        idx.keys_for(())


# ------------------------------------------------------------------ decompression bombs


def _write_bomb(path: Path, header: bytes, zeros: int) -> None:
    """`header` followed by `zeros` zero bytes, gzipped in a streaming way (the test itself stays small)."""
    chunk = bytes(1 << 20)
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(header)
        for _ in range(zeros // len(chunk)):
            f.write(chunk)


def _peak_mb(fn) -> float:
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak / 2**20


@pytest.mark.parametrize("verify", [False, True])
def test_gzip_bomb_refused_without_decompressing_it(tmp_path, verify):
    # 200 MB of zeros behind a header announcing the official t10k labels (10,008 bytes): ~200 KB on disk.
    bomb = tmp_path / "t10k-labels-idx1-ubyte.gz"
    _write_bomb(bomb, struct.pack(">II", idx.LABELS_MAGIC, 10_000), 200 << 20)
    assert bomb.stat().st_size < 2 << 20
    errors = []

    def read():
        try:
            idx.read_idx(bomb, "labels", idx.FILES["t10k-labels"] if verify else None)
        except data.DataError as e:
            errors.append(str(e))

    peak = _peak_mb(read)
    assert errors and errors[0].startswith(f"{bomb}: unexpected bytes: more than 10008 bytes"), errors
    assert peak < 8, f"{peak:.0f} MB allocated to refuse a 10 KB file"


def test_gzip_bomb_in_the_data_folder_is_refused_by_load(isolated):
    folder = _test_files_only(isolated / "d")
    images = folder / "t10k-images-idx3-ubyte.gz"
    _write_bomb(images, struct.pack(">IIII", idx.IMAGES_MAGIC, 10_000, 28, 28), 200 << 20)
    errors = []

    def load():
        try:
            data.load(folder, verify=True, download=False, splits=("test",), progress=False)
        except data.DataError as e:
            errors.append(str(e))

    peak = _peak_mb(load)
    assert errors and str(images) in errors[0] and "7840016" in errors[0], errors
    assert peak < 40, f"{peak:.0f} MB allocated to refuse a 7.8 MB file"


def test_oversized_raw_file_not_read_whole(tmp_path):
    path = tmp_path / "labels"
    with open(path, "wb") as f:
        f.write(struct.pack(">II", idx.LABELS_MAGIC, 4) + bytes(4))
        f.truncate(64 << 20)  # sparse: 64 MB the header does not announce
    errors = []

    def read():
        try:
            idx.read_idx(path, "labels")
        except data.DataError as e:
            errors.append(str(e))

    assert _peak_mb(read) < 8
    assert errors and errors[0].startswith(f"{path}: unexpected bytes"), errors
