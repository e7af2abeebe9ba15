"""Fetch a patch into the per-user cache: resumable, size-capped, time-boxed, verified, atomic.

``pull(url, sha256)`` downloads to ``<cache>/patches/<name>.reft.part``
(resuming with an HTTP Range request when a part is there), refuses more
than the size cap, stops at an overall deadline, checks the sha256, then
validates the file as a patch (and against a base model when given) before
publishing it in place (``files.publish``).  Once pulled, a patch is used
offline by name: ``edge-reft run --patch alice``.

The part file is opened without following a symlink and must be a regular
file; only http and https are fetched, redirects included; credentials in a
URL are sent as Basic auth and never shown in a message.

Failures come in two kinds a caller can tell apart: ``DownloadError`` (the source
could not be fetched: network, HTTP status, deadline, a cut connection; trying again
later may work) and ``DownloadRefused`` (what arrived is not what was asked for: over
the size cap, another sha256; trying again fetches the same bytes).  ``fetch`` reads a
small document (a registry's manifest) under the same rules.
"""
from __future__ import annotations

import base64
import http.client
import os
import re
import stat
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from .errors import ReftError
from .files import open_regular, publish, sha256_file
from .models import cache_dir
from .outputs import check_output
from .patch import BaseModel
from .reftfile import load_patch
from .spec import DEFAULT_MAX_BYTES, PATCH_NAME, PATCH_SUFFIX

NAME = re.compile(PATCH_NAME)
SCHEMES = ("http", "https")
DEFAULT_DEADLINE = 600.0  # seconds for the whole download: a patch is kilobytes


class DownloadError(ReftError):
    """The source could not be fetched (network, HTTP status, deadline, cut connection)."""


class DownloadRefused(ReftError):
    """The bytes fetched are refused: more than the size cap, or not the sha256 asked for."""


def patches_dir() -> Path:
    return cache_dir() / "patches"


def resolve(ref: str | os.PathLike[str]) -> Path:
    """A patch argument: an existing path, or the name of a pulled patch."""
    p = Path(ref)
    if p.exists() or not NAME.fullmatch(str(ref)):
        return p
    cached = patches_dir() / f"{ref}{PATCH_SUFFIX}"
    if cached.exists():
        return cached
    raise ReftError(f"patch {str(ref)!r}: no such file, and no pulled patch of that name in {patches_dir()}")


def redact(url: str) -> str:
    """``url`` fit for a message: no user:password, no query (tokens live there)."""
    try:
        u = urllib.parse.urlsplit(url)
    except ValueError:
        return "<an unparsable URL>"
    host = u.hostname or ""
    if u.port:
        host += f":{u.port}"
    return urllib.parse.urlunsplit((u.scheme, host, u.path, "…" if u.query else "", ""))


def default_name(source: str) -> str:
    """The patch name a source implies: its last path segment, without query, fragment or .reft."""
    path = urllib.parse.urlsplit(source).path if _is_url(source) else source
    return Path(path.rstrip("/")).name.removesuffix(PATCH_SUFFIX)


def _is_url(source: str) -> bool:
    return re.match(r"[A-Za-z][A-Za-z0-9+.\-]*://", source) is not None and not source.startswith("file://")


def pull(source: str, sha256: str, name: str | None = None, base: BaseModel | None = None,
         max_bytes: int = DEFAULT_MAX_BYTES, timeout: float = 30.0, folder: Path | None = None,
         deadline: float = DEFAULT_DEADLINE) -> Path:
    """Download (or copy) ``source`` to the cache as ``name``.reft; return its path."""
    want = sha256.lower()
    if not re.fullmatch(r"[0-9a-f]{64}", want):
        raise ReftError(f"--sha256: {sha256!r} is not 64 hex digits")
    url = _is_url(source)
    if url and urllib.parse.urlsplit(source).scheme.lower() not in SCHEMES:
        raise DownloadError(f"{redact(source)}: only http:// and https:// URLs are fetched")
    name = default_name(source) if name is None else name
    if not NAME.fullmatch(name):
        raise ReftError(f"--name: {name!r} is not a plain patch name (letters, digits, '_', '-', '.')")
    folder = folder or patches_dir()
    folder.mkdir(parents=True, exist_ok=True)
    final, part = folder / f"{name}{PATCH_SUFFIX}", folder / f"{name}{PATCH_SUFFIX}.part"
    local = None if url else Path(source.removeprefix("file://"))
    check_output(final, [local], flag="--name")
    if _regular(final, nofollow=True) and sha256_file(final) == want:
        return final
    if url:
        _download(source, part, max_bytes, timeout, deadline)
    else:
        _copy(local, part, max_bytes, source)
    got = sha256_file(part)
    if got != want:
        part.unlink()
        raise DownloadRefused(f"{redact(source)}: sha256 is {got}, expected {want}; nothing was kept")
    try:
        load_patch(part, model=base, max_bytes=max_bytes)
    except ReftError:
        part.unlink()
        raise
    return publish(part, final)


def fetch(url: str, folder: Path, max_bytes: int, timeout: float = 30.0,
          deadline: float = DEFAULT_DEADLINE) -> bytes:
    """The body of an http(s) ``url`` (a small document: a manifest), under a pull's rules
    (http/https only, redirects too; the size cap; the deadline), spooled through a
    temporary file in ``folder`` that is always removed."""
    if urllib.parse.urlsplit(url).scheme.lower() not in SCHEMES:
        raise DownloadError(f"{redact(url)}: only http:// and https:// URLs are fetched")
    fd, name = tempfile.mkstemp(prefix=".fetch.", suffix=".part", dir=folder)
    os.close(fd)
    try:
        _download(url, Path(name), max_bytes, timeout, deadline)
        return Path(name).read_bytes()
    finally:
        Path(name).unlink(missing_ok=True)


def _regular(path: Path, nofollow: bool = False) -> bool:
    try:
        st = os.lstat(path) if nofollow else os.stat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode)


def _open_part(part: Path, append: bool) -> int:
    """The part file for writing: never through a symlink, only a regular file."""
    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    flags |= os.O_APPEND if append else 0
    try:
        fd = os.open(part, flags, 0o600)
    except OSError as e:
        raise ReftError(f"{part}: cannot be opened for writing ({e.strerror or e}); if it is a "
                        "symlink or not a file, remove it") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ReftError(f"{part}: exists and is not a regular file; remove it")
    if not append:
        os.ftruncate(fd, 0)
    os.set_blocking(fd, True)
    return fd


def _copy(src: Path, part: Path, max_bytes: int, source: str) -> None:
    try:
        fd = open_regular(src)
    except OSError as e:
        raise ReftError(f"{source}: no such file" if isinstance(e, FileNotFoundError)
                        else f"{source}: cannot be read ({e.strerror or e})") from None
    with os.fdopen(fd, "rb") as f, os.fdopen(_open_part(part, False), "wb") as out:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            out.close()
            part.unlink()
            raise DownloadRefused(f"{source}: {size} bytes exceeds the limit of {max_bytes}")
        out.write(f.read(max_bytes + 1)[:max_bytes])


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[override]
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if scheme not in SCHEMES:
            raise DownloadError(f"{redact(req.full_url)}: redirected to a {scheme or 'relative'}:// URL; "
                            "only http:// and https:// are followed")
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).hostname != urllib.parse.urlsplit(req.full_url).hostname:
            new.remove_header("Authorization")  # credentials go to the host they were given for
        return new


def _opener(sockets: list) -> urllib.request.OpenerDirector:
    """http(s) only (no ftp:, file:, data:), every socket recorded so a deadline can cut it."""
    class Conn(http.client.HTTPConnection):
        def connect(self) -> None:
            super().connect()
            sockets.append(self.sock)

    class TLSConn(http.client.HTTPSConnection):
        def connect(self) -> None:
            super().connect()
            sockets.append(self.sock)

    class HTTP(urllib.request.HTTPHandler):
        def http_open(self, req):  # type: ignore[override]
            return self.do_open(Conn, req)

    class HTTPS(urllib.request.HTTPSHandler):
        def https_open(self, req):  # type: ignore[override]
            return self.do_open(TLSConn, req, context=self._context)

    op = urllib.request.OpenerDirector()
    for h in (urllib.request.ProxyHandler(), HTTP(), HTTPS(), urllib.request.HTTPDefaultErrorHandler(),
              _HttpOnlyRedirects(), urllib.request.HTTPErrorProcessor(), urllib.request.UnknownHandler()):
        op.add_handler(h)
    return op


def _request(url: str, have: int) -> urllib.request.Request:
    u = urllib.parse.urlsplit(url)
    host = u.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    netloc += f":{u.port}" if u.port else ""
    headers = {"Range": f"bytes={have}-"} if have else {}
    if u.username is not None:
        cred = f"{urllib.parse.unquote(u.username)}:{urllib.parse.unquote(u.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(cred.encode()).decode()
    return urllib.request.Request(urllib.parse.urlunsplit((u.scheme, netloc, u.path, u.query, "")),
                                  headers=headers)


def _download(url: str, part: Path, max_bytes: int, timeout: float, deadline: float) -> None:
    shown = redact(url)
    have = part.stat().st_size if _regular(part, nofollow=True) else 0
    try:
        req = _request(url, have)
    except ValueError as e:
        raise DownloadError(f"{shown}: not a valid URL ({e})") from None
    sockets: list = []
    expired = threading.Event()

    def cut() -> None:  # the overall deadline: shut every socket, whatever it is waiting for
        expired.set()
        for s in list(sockets):
            try:
                s.shutdown(2)
            except OSError:
                pass
    timer = threading.Timer(deadline, cut)
    timer.daemon = True
    timer.start()
    start = have
    try:
        total, expected, broken = _fetch(_opener(sockets), req, shown, part, have, max_bytes,
                                         min(timeout, deadline))
    except ReftError:
        if expired.is_set():
            raise DownloadError(f"{shown}: no answer within the deadline of {deadline:g} s") from None
        raise
    finally:
        timer.cancel()
    if total is None:
        return  # 416: the part is already whole
    if expired.is_set() or broken or (expected is not None and total < expected):
        of = f" of {expected}" if expected is not None else ""
        why = (f"not finished within the deadline of {deadline:g} s" if expired.is_set()
               else "the connection was cut before the end")
        if total <= start and start:
            part.unlink(missing_ok=True)
            raise DownloadError(f"{shown}: {why}, at {total}{of} bytes, again with no progress: the "
                            "server announces more than it sends (a wrong Content-Length?); the "
                            "partial download was removed")
        raise DownloadError(f"{shown}: {why}, at {total}{of} bytes; run the same pull again to resume it")


def _fetch(opener: urllib.request.OpenerDirector, req: urllib.request.Request, shown: str, part: Path,
           have: int, max_bytes: int, timeout: float) -> tuple[int | None, int | None, bool]:
    """(bytes in the part, bytes announced, whether the transfer broke) of one request."""
    try:
        resp = opener.open(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the part is already whole
            return None, None, False
        raise DownloadError(f"{shown}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
        reason = getattr(e, "reason", None) or type(e).__name__
        raise DownloadError(f"{shown}: cannot download ({str(reason)[:200]})") from None
    with resp:
        if resp.status != 206:
            have = 0  # the server sent the whole file: start over
        length = resp.headers.get("Content-Length")
        expected = have + int(length) if length is not None and length.isdigit() else None
        if expected is not None and expected > max_bytes:
            raise DownloadRefused(f"{shown}: {expected} bytes exceeds the limit of {max_bytes}")
        total, broken = have, False
        with os.fdopen(_open_part(part, append=bool(have)), "wb") as f:
            try:
                while block := resp.read1(1 << 16):
                    total += len(block)
                    if total > max_bytes:
                        f.close()
                        part.unlink()
                        raise DownloadRefused(f"{shown}: more than the limit of {max_bytes} bytes; nothing was kept")
                    f.write(block)
            except (OSError, http.client.HTTPException, ValueError):
                broken = True  # a dropped connection (or a chunked body cut): what arrived is kept
    return total, expected, broken
