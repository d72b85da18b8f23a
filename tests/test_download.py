"""The download path against an HTTP server on 127.0.0.1 serving a fixture (never the internet)."""

from __future__ import annotations

import hashlib
import socket
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from refit_gym.data.download import DownloadError, download, fetch_dataset

PAYLOAD = b"0 1 2 3\n1 2 3\n" * 1000


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    root = tmp_path / "served"
    root.mkdir()
    (root / "train.txt").write_bytes(PAYLOAD)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_download_verifies_and_writes(server: str, tmp_path: Path) -> None:
    dest = tmp_path / "data" / "book" / "train.txt"
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    assert download(f"{server}/train.txt", dest, sha, progress=False) == dest
    assert dest.read_bytes() == PAYLOAD
    assert _leftovers(dest.parent) == ["train.txt"]
    # A verified file is kept, not fetched again (the server is not even asked).
    assert download("http://127.0.0.1:9/unreachable", dest, sha, progress=False) == dest


def test_checksum_mismatch_leaves_nothing(server: str, tmp_path: Path) -> None:
    dest = tmp_path / "data" / "train.txt"
    with pytest.raises(DownloadError, match="checksum mismatch.*Nothing was saved"):
        download(f"{server}/train.txt", dest, "0" * 64, progress=False)
    assert _leftovers(dest.parent) == []


def test_http_error_and_offline_leave_nothing(server: str, tmp_path: Path) -> None:
    dest = tmp_path / "data" / "train.txt"
    with pytest.raises(DownloadError, match="404"):
        download(f"{server}/missing.txt", dest, "0" * 64, progress=False)
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match="could not download.*network connection"):
        download(f"http://127.0.0.1:{port}/train.txt", dest, "0" * 64, progress=False, timeout=5)
    assert _leftovers(dest.parent) == []


def test_fetch_dataset_by_spec(server: str, tmp_path: Path) -> None:
    spec = {"name": "book", "format": "lightgcn",
            "urls": {"train.txt": f"{server}/train.txt"},
            "sha256": {"train.txt": hashlib.sha256(PAYLOAD).hexdigest()}}
    assert fetch_dataset(spec, tmp_path, progress=False) == tmp_path / "book"
    assert (tmp_path / "book" / "train.txt").read_bytes() == PAYLOAD
    with pytest.raises(DownloadError, match="no download address"):
        fetch_dataset({"name": "ml-1m_clean", "format": "diffrec"}, tmp_path)
