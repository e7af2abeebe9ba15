"""`pull` against hostile servers and planted files on 127.0.0.1 (issue 14, item 7)."""
from __future__ import annotations

import hashlib
import http.server
import os
import threading
import time
from contextlib import contextmanager

import pytest

from edge_reft.errors import ReftError
from edge_reft.pull import pull, redact
from hostile import valid

PATCH = valid().bytes()
SHA = hashlib.sha256(PATCH).hexdigest()


class Hostile(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen_auth: list = []

    def do_GET(self):
        self.seen_auth.append(self.headers.get("Authorization"))
        path = self.path.split("?")[0]
        if path == "/ok.reft":
            self._send(200, PATCH, {"Content-Length": str(len(PATCH))})
        elif path == "/to-ftp":
            self._send(302, b"", {"Location": "ftp://127.0.0.1/x.reft", "Content-Length": "0"})
        elif path == "/fail":
            self._send(500, b"", {"Content-Length": "0"})
        elif path == "/trickle":  # one byte at a time, forever
            self.send_response(200)
            self.send_header("Content-Length", str(len(PATCH)))
            self.end_headers()
            for b in PATCH:
                self.wfile.write(bytes([b]))
                self.wfile.flush()
                time.sleep(0.2)
        elif path == "/chunked-cut":  # two chunks of a chunked body, then the connection drops
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            half = PATCH[:200]
            self.wfile.write(f"{len(half):x}\r\n".encode() + half + b"\r\n")
            self.wfile.write(b"400\r\n" + PATCH[200:300])
            self.wfile.flush()
            self.close_connection = True
        elif path == "/liar":  # says the whole length, sends half, whatever the Range
            self._send(200, PATCH[:len(PATCH) // 2], {"Content-Length": str(len(PATCH))})
            self.close_connection = True
        else:
            self._send(404, b"", {"Content-Length": "0"})

    def _send(self, code, body, headers):
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextmanager
def server():
    Hostile.seen_auth = []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()


def test_symlinked_part_file_is_refused_and_its_target_untouched(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    folder = tmp_path / "c"
    folder.mkdir()
    os.symlink(victim, folder / "ok.reft.part")
    with server() as url:
        with pytest.raises(ReftError, match="symlink or not a file"):
            pull(f"{url}/ok.reft", SHA, folder=folder)
    assert victim.read_text() == "precious\n"
    assert not (folder / "ok.reft").exists()


def test_planted_symlink_at_the_final_name_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    folder = tmp_path / "c"
    folder.mkdir()
    os.symlink(victim, folder / "ok.reft")
    with server() as url:
        placed = pull(f"{url}/ok.reft", SHA, folder=folder)
    assert not placed.is_symlink() and placed.read_bytes() == PATCH
    assert victim.read_text() == "precious\n"


def test_redirect_to_ftp_is_refused(tmp_path):
    with server() as url:
        with pytest.raises(ReftError, match="only http:// and https://"):
            pull(f"{url}/to-ftp", SHA, name="x", folder=tmp_path)
    with pytest.raises(ReftError, match="only http:// and https://"):
        pull("ftp://127.0.0.1/x.reft", SHA, folder=tmp_path)


def test_credentials_are_sent_but_never_shown(tmp_path):
    with server() as url:
        authed = url.replace("http://", "http://alice:s3cret@")
        with pytest.raises(ReftError) as info:
            pull(f"{authed}/fail?token=t0ps3cret", SHA, name="x", folder=tmp_path)
        assert Hostile.seen_auth[-1].startswith("Basic ")
    assert "s3cret" not in str(info.value) and "t0ps3cret" not in str(info.value)
    assert "HTTP 500" in str(info.value)
    assert "s3cret" not in redact("https://alice:s3cret@host/p.reft?sig=s3cret")


def test_fragment_and_query_are_not_part_of_the_name(tmp_path):
    with server() as url:
        placed = pull(f"{url}/ok.reft#frag", SHA, folder=tmp_path)
        again = pull(f"{url}/ok.reft?v=2#frag", SHA, folder=tmp_path)
    assert placed.name == again.name == "ok.reft"


@pytest.mark.parametrize("name", ["evil\n", "ok\n", "a\nb"])
def test_names_with_a_newline_are_refused(tmp_path, name):
    src = tmp_path / "src.reft"
    src.write_bytes(PATCH)
    with pytest.raises(ReftError, match="plain patch name"):
        pull(str(src), SHA, name=name, folder=tmp_path / "c")


@pytest.mark.timeout(30)
def test_a_trickling_server_stops_at_the_deadline(tmp_path):
    t = time.monotonic()
    with server() as url:
        with pytest.raises(ReftError, match="deadline of 1.5 s"):
            pull(f"{url}/trickle", SHA, folder=tmp_path, deadline=1.5)
    assert time.monotonic() - t < 10


def test_a_cut_chunked_download_says_so(tmp_path):
    with server() as url:
        with pytest.raises(ReftError, match="cut before the end") as info:
            pull(f"{url}/chunked-cut", SHA, folder=tmp_path)
    assert "sha256" not in str(info.value)


def test_a_lying_content_length_ends_after_one_retry(tmp_path):
    with server() as url:
        with pytest.raises(ReftError, match="run the same pull again"):
            pull(f"{url}/liar", SHA, folder=tmp_path)
        with pytest.raises(ReftError, match="announces more than it sends") as info:
            pull(f"{url}/liar", SHA, folder=tmp_path)
    assert "run the same pull again" not in str(info.value)
    assert not list(tmp_path.iterdir())


def test_a_fifo_source_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "f.reft"
    os.mkfifo(fifo)
    with pytest.raises(ReftError, match="not a regular file"):
        pull(str(fifo), SHA, folder=tmp_path / "c")
