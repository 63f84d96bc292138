"""Downloading the Fashion-MNIST files from a mirror into a folder.

Each file goes to a temp file in the same folder and is renamed into place
only after its byte count and the official gz MD5 checked out, so a broken
transfer never leaves a file the next lookup would take for a good one.
"""

from __future__ import annotations

import hashlib
import http.client
import urllib.error
import urllib.request
from pathlib import Path

from .. import atomic
from .idx import FILES, DataError, files_in

OFFICIAL_MIRROR = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
MIRROR_ENV = "FMNIST_MIRROR"


def download_file(url: str, dest: Path, md5: str | None = None, progress: bool = True, timeout: float = 30.0) -> Path:
    """Download `url` to `dest` through a temp file in the same folder; check the
    byte count and (if given) the MD5 before renaming it into place."""
    received_md5 = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, leave=False)
            received = 0
            try:
                with atomic.atomic_open(dest) as f:
                    while True:
                        chunk = resp.read(1 << 16)
                        if not chunk:
                            break
                        f.write(chunk)
                        received_md5.update(chunk)
                        received += len(chunk)
                        if bar is not None:
                            bar.update(len(chunk))
                    if total is not None and received != total:
                        raise DataError(f"{url}: transfer broke off after {received} of {total} bytes")
                    if md5 is not None and received_md5.hexdigest() != md5:
                        raise DataError(f"{url}: checksum mismatch: MD5 {received_md5.hexdigest()}, expected {md5}")
            finally:
                if bar is not None:
                    bar.close()
    except DataError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise DataError(f"{url}: {getattr(e, 'reason', None) or e}") from None
    except http.client.HTTPException as e:  # IncompleteRead, RemoteDisconnected, ...
        raise DataError(f"{url}: transfer failed: {e!r}") from None
    return dest


def download_all(
    dest_dir: Path, base_url: str, md5s: dict[str, str] | None = None, progress: bool = True, keys=None
) -> dict[str, Path]:
    """Download the gz files (of `keys`, default all four) that `dest_dir` lacks from `base_url`,
    each checked against its gz MD5 in `md5s` (default: the official files')."""
    md5s = md5s if md5s is not None else {k: f.gz_md5 for k, f in FILES.items()}
    base = base_url if base_url.endswith("/") else base_url + "/"
    found, _ = files_in(dest_dir, keys)
    for key in keys or FILES:
        f = FILES[key]
        if key not in found:
            found[key] = download_file(base + f.name + ".gz", dest_dir / (f.name + ".gz"), md5s.get(key), progress)
    return found
