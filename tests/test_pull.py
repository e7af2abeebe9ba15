"""`edge-reft pull` against a real HTTP server on 127.0.0.1 (Range requests, drops, hostile files)."""
from __future__ import annotations

import hashlib
import http.server
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

from edge_reft.errors import PatchMismatchError, ReftError, ReftFormatError
from edge_reft.patch import BaseModel, random_patch
from edge_reft.pull import pull
from edge_reft.reftfile import save_patch
from hostile import CORPUS


class Files(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    drop_after: dict[str, int] = {}   # serve this many bytes once, then cut the connection
    ranges: list[str] = []

    def do_GET(self):
        data = self.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng:
            self.ranges.append(rng)
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = self.drop_after.pop(self.path, None)
        self.wfile.write(body[:cut] if cut is not None else body)

    def log_message(self, *args):
        pass


@contextmanager
def http_files(files: dict[str, bytes], drop_after: dict[str, int] | None = None):
    Files.files, Files.drop_after, Files.ranges = files, dict(drop_after or {}), []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Files)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()


@pytest.fixture
def patch_bytes(engine_q4, tmp_path) -> bytes:
    return save_patch(random_patch(engine_q4.base, [(15, "l1", 4)], scale=8.0, seed=5), tmp_path / "a.reft").read_bytes()


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_pull_verify_place_and_use_offline(patch_bytes, engine_q4, tmp_path, smol_q4):
    cache = tmp_path / "cache"
    with http_files({"/alice.reft": patch_bytes}) as url:
        r = subprocess.run([sys.executable, "-m", "edge_reft", "pull", f"{url}/alice.reft", "--sha256",
                            sha(patch_bytes), "--base", str(smol_q4)], capture_output=True, text=True,
                           env={**__import__("os").environ, "EDGE_REFT_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr
    placed = cache / "patches" / "alice.reft"
    assert placed.read_bytes() == patch_bytes and not list((cache / "patches").glob("*.part"))
    # the server is gone: use it by name, offline
    r = subprocess.run([sys.executable, "-m", "edge_reft", "run", "--patch", "alice", "-p", "Hi", "-n", "4",
                        "--json"], capture_output=True, text=True,
                       env={**__import__("os").environ, "EDGE_REFT_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr


def test_interrupted_download_resumes_with_range(patch_bytes, tmp_path):
    with http_files({"/p.reft": patch_bytes}, drop_after={"/p.reft": 5000}) as url:
        with pytest.raises(ReftError, match="run the same pull again to resume"):
            pull(f"{url}/p.reft", sha(patch_bytes), folder=tmp_path / "c")
        part = tmp_path / "c" / "p.reft.part"
        assert part.exists() and part.stat().st_size == 5000
        placed = pull(f"{url}/p.reft", sha(patch_bytes), folder=tmp_path / "c")
        assert Files.ranges == ["bytes=5000-"]
    assert placed.read_bytes() == patch_bytes and not part.exists()


def test_wrong_hash_keeps_nothing(patch_bytes, tmp_path):
    with http_files({"/p.reft": patch_bytes}) as url:
        with pytest.raises(ReftError, match="sha256 is"):
            pull(f"{url}/p.reft", "0" * 64, folder=tmp_path / "c")
    assert not list((tmp_path / "c").iterdir())


def test_oversized_download_is_refused(tmp_path):
    big = b"\0" * (17 << 20)
    with http_files({"/big.reft": big}) as url:
        with pytest.raises(ReftError, match="exceeds the limit"):
            pull(f"{url}/big.reft", sha(big), folder=tmp_path)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["huge-array-43-bytes", "nan-weight", "rotate-not-orthonormal"])
def test_hostile_file_with_a_matching_hash_is_still_refused(tmp_path, name):
    data = CORPUS[name][0]()
    with http_files({"/h.reft": data}) as url:
        with pytest.raises(ReftFormatError):
            pull(f"{url}/h.reft", sha(data), folder=tmp_path)
    assert not list(tmp_path.iterdir())


def test_patch_for_another_model_is_refused(patch_bytes, tmp_path):
    other = BaseModel("llama", 576, 30, "cd" * 32, "other")
    src = tmp_path / "src.reft"
    src.write_bytes(patch_bytes)
    with pytest.raises(PatchMismatchError):
        pull(str(src), sha(patch_bytes), name="x", base=other, folder=tmp_path / "c")
    assert not list((tmp_path / "c").iterdir())


@pytest.mark.parametrize("name", ["../evil", "/abs", "a/b", ".hidden"])
def test_bad_names_are_refused(patch_bytes, tmp_path, name):
    src = tmp_path / "src.reft"
    src.write_bytes(patch_bytes)
    with pytest.raises(ReftError, match="plain patch name"):
        pull(str(src), sha(patch_bytes), name=name, folder=tmp_path / "c")


def test_missing_file_and_404(tmp_path):
    with pytest.raises(ReftError, match="no such file"):
        pull(str(tmp_path / "nope.reft"), "a" * 64, folder=tmp_path)
    with http_files({}) as url:
        with pytest.raises(ReftError, match="HTTP 404"):
            pull(f"{url}/nope.reft", "a" * 64, folder=tmp_path)
    assert Path(tmp_path).exists()
