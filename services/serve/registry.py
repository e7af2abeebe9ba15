"""Patches from a registry: a JSON manifest of names, URLs and sha256s, pulled on first use.

``edge-reft serve --patches DIR --registry URL``: URL is the manifest, UTF-8 JSON of at
most 32 MiB::

    {"patches": {
        "alice": {"url": "alice.reft", "sha256": "<64 hex digits>", "size": 27968},
        "bob":   {"url": "https://cdn.example.org/p/bob.reft", "sha256": "<64 hex digits>"}
    }}

``patches`` maps a patch name (a file stem: letters, digits, ``_``, ``-``, ``.``, no
leading dot, no ``..``) to ``url`` (http or https; a relative URL is resolved against the
manifest's own URL), ``sha256`` (of the file's bytes, hex) and, optional, ``size`` (its
bytes: a download that runs past it is cut and refused).  Other keys are ignored (room
to grow).  A manifest that is not such an object is refused whole; an entry that breaks
a rule fails only its own name, with the rule named.

A name found in DIR is served from DIR: the folder wins over the registry.  Any other
name is looked up in the manifest, which is fetched (pull's rules: http/https only,
redirects too, a size cap, a deadline) on first use, again once it is older than ``ttl``
seconds, and for a name it lacks at most once per ``ttl`` (a new user is found without
waiting a whole ttl, while a flood of unknown names costs one fetch per ttl).  A failed
fetch is tried again after min(ttl, 30 s); meanwhile the last good manifest answers (it
is also kept in the cache folder, so it survives a restart), and patches already pulled
keep being served.  A patch is pulled with ``pull`` into the cache folder as NAME.reft
(sha256 verified, validated against the model, published atomically; a file already
there with the right sha256 is used as is) under a per-name lock file, so server
processes sharing the folder download it once.  The cache folder is never pruned: a
patch is kilobytes.

Errors: a registry that cannot be reached (the manifest or the patch) is
``RegistryUnavailable`` (the server answers 502), remembered for the retry interval so
a down registry is not hammered; a patch whose bytes are not the manifest's (sha256,
size) is ``PatchRefused`` (422), and nothing of it is kept.  Messages name the patch,
never the registry's address; the server's log gets the (redacted) address.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from edge_reft.errors import ReftError
from edge_reft.files import lock_file, locked, open_regular, write_bytes
from edge_reft.patch import BaseModel, Patch
from edge_reft.pull import SCHEMES, DownloadError, DownloadRefused, fetch, pull, redact
from edge_reft.reftfile import load_patch
from edge_reft.spec import DEFAULT_MAX_BYTES, PATCH_NAME, PATCH_SUFFIX

NAME = re.compile(PATCH_NAME)
MAX_MANIFEST_BYTES = 32 << 20  # ~200 000 entries
RETRY_CAP = 30.0  # seconds: a failed fetch is tried again after min(ttl, this)


class RegistryUnavailable(ReftError):
    """The registry cannot give a patch now: unreachable, an HTTP error, a malformed manifest
    or entry.  ``retry_after``: seconds before the server asks it again."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class PatchRefused(ReftError):
    """The registry's file is not the one its manifest describes (sha256, size)."""


@dataclass(frozen=True)
class Entry:
    """Where one patch lives: its manifest entry, the URL resolved."""
    name: str
    url: str
    sha256: str
    size: int | None = None


def parse_manifest(data: bytes, where: str) -> dict[str, Entry | str]:
    """Each name of a manifest to its Entry, or to the problems of its entry (a string)."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ReftError(f"the manifest is not UTF-8 JSON ({str(e)[:120]})") from None
    patches = doc.get("patches") if isinstance(doc, dict) else None
    if not isinstance(patches, dict):
        raise ReftError('the manifest: expected a JSON object {"patches": {NAME: {"url": ..., '
                        f'"sha256": ...}}}}, found {type(patches if isinstance(doc, dict) else doc).__name__}')
    out: dict[str, Entry | str] = {}
    for name, e in patches.items():
        if NAME.match(name):  # other keys can never be asked for
            out[name] = _entry(name, e, where)
    return out


def _entry(name: str, e: object, where: str) -> Entry | str:
    if not isinstance(e, dict):
        return f"expected an object with url and sha256, found {type(e).__name__}"
    problems, url, sha, size = [], e.get("url"), e.get("sha256"), e.get("size")
    if not isinstance(url, str) or not url:
        problems.append("url: missing or not a string")
    else:
        try:
            url = urllib.parse.urljoin(where, url)
            scheme = urllib.parse.urlsplit(url).scheme.lower()
        except ValueError:
            scheme = "an unparsable"
        if scheme not in SCHEMES:
            problems.append(f"url: {scheme or 'no'} scheme, expected http or https")
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", sha):
        problems.append("sha256: expected 64 hex digits")
    if size is not None and (type(size) is not int or not 0 < size <= DEFAULT_MAX_BYTES):
        problems.append(f"size: {str(size)[:20]}, expected bytes in 1..{DEFAULT_MAX_BYTES}")
    return "; ".join(problems) if problems else Entry(name, url, sha.lower(), size)


class Registry:
    """The manifest at ``url`` (fetched when due) and the patches it names, pulled into
    ``cache``.  Thread-safe: one manifest fetch at a time; a lookup of a name the manifest in
    hand has does not wait for a fetch in flight."""

    def __init__(self, url: str, cache: str | os.PathLike[str], ttl: float = 300.0,
                 base: BaseModel | None = None, timeout: float = 10.0, deadline: float = 60.0):
        if urllib.parse.urlsplit(url).scheme.lower() not in SCHEMES:
            raise ReftError(f"--registry {redact(url)}: expected the http:// or https:// URL of a manifest")
        if not ttl > 0:
            raise ReftError(f"--registry-ttl {ttl}: expected seconds > 0")
        try:
            Path(cache).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ReftError(f"--registry-cache {cache}: cannot be created ({e.strerror or e})") from None
        self.url, self.cache, self.ttl, self.base = url, Path(cache).resolve(), float(ttl), base
        self.timeout, self.deadline, self.retry = timeout, deadline, min(float(ttl), RETRY_CAP)
        self.fetches = 0  # manifest fetches tried (for tests and /health)
        self._entries: dict[str, Entry | str] | None = None
        self._tried = self._good = self._miss = -math.inf  # monotonic times
        self._failed: str | None = None  # why the last fetch failed
        self._failures: dict[str, tuple[Entry, float, ReftError]] = {}  # entry, until when, error
        self._state, self._fetching = threading.Lock(), threading.Lock()
        # the last good manifest, kept for a restart while the registry is down
        self._saved = self.cache / f".manifest-{hashlib.sha256(url.encode()).hexdigest()[:16]}.json"
        try:
            with os.fdopen(open_regular(self._saved, nofollow=True), "rb") as f:
                self._entries = parse_manifest(f.read(MAX_MANIFEST_BYTES + 1), url)
        except (OSError, ReftError):
            pass

    def entry(self, name: str) -> Entry | None:
        """Where patch ``name`` lives (None: the manifest does not list it)."""
        with self._state:
            entries = self._entries
            miss = entries is None or name not in entries
            due = self._due(time.monotonic(), miss)
        # a name in the manifest in hand is answered from it while another thread fetches; a
        # miss waits for that fetch, then fetches itself only if still due
        if due and self._fetching.acquire(blocking=miss):
            try:
                with self._state:
                    due = self._due(time.monotonic(), self._entries is None or name not in self._entries)
                if due:
                    self._refresh(name)
            finally:
                self._fetching.release()
            with self._state:
                entries = self._entries
        if entries is None:
            raise RegistryUnavailable(f"patch {name!r}: not in the server's folder, and the patch registry "
                                      f"is unavailable ({self._failed}); retry later", self.retry)
        e = entries.get(name)
        if isinstance(e, str):
            raise RegistryUnavailable(f"patch {name!r}: the registry's manifest entry is invalid ({e})",
                                      self.retry)
        return e

    def _due(self, now: float, miss: bool) -> bool:
        if self._failed is not None:
            return now - self._tried >= self.retry
        return now - self._tried >= self.ttl or (miss and now - self._miss >= self.ttl)

    def _refresh(self, name: str) -> None:
        self.fetches += 1
        try:
            data = fetch(self.url, self.cache, MAX_MANIFEST_BYTES, self.timeout, self.deadline)
            entries = parse_manifest(data, self.url)
        except ReftError as e:
            why = str(e).replace(redact(self.url), "the manifest")
            print(f"[edge-reft] registry {redact(self.url)}: {e}; trying again in {self.retry:g} s",
                  file=sys.stderr, flush=True)
            with self._state:
                self._tried, self._failed = time.monotonic(), why
            return
        try:
            write_bytes(self._saved, data)
        except OSError:
            pass  # only a restart while the registry is down needs it
        with self._state:
            self._entries, self._failed = entries, None
            self._tried = self._good = time.monotonic()
            if name not in entries:
                self._miss = self._tried

    def file(self, name: str) -> Path:
        return self.cache / f"{name}{PATCH_SUFFIX}"

    def patch(self, e: Entry) -> Patch:
        """The patch of entry ``e``: pulled once into the cache folder, verified, loaded.  A
        failure is remembered: unreachable for the retry interval, refused for the ttl (the
        registry may fix the file under the same entry)."""
        with self._state:
            failed = self._failures.get(e.name)
        if failed is not None and failed[0] == e and time.monotonic() < failed[1]:
            raise failed[2].with_traceback(None)
        cap = min(e.size or DEFAULT_MAX_BYTES, DEFAULT_MAX_BYTES)
        final = self.file(e.name)
        part = final.with_name(final.name + ".part")
        try:
            with locked(lock_file(final)):  # other server processes sharing the folder
                for resumed in (part.exists(), False):
                    try:
                        path = pull(e.url, e.sha256, e.name, self.base, max_bytes=cap, timeout=self.timeout,
                                    folder=self.cache, deadline=self.deadline)
                        break
                    except DownloadRefused:
                        if not resumed:
                            raise
                        part.unlink(missing_ok=True)  # a part left by another version: start over
                patch = load_patch(path, max_bytes=cap)
        except DownloadError as x:
            print(f"[edge-reft] registry: {x}", file=sys.stderr, flush=True)
            err: ReftError = RegistryUnavailable(f"patch {e.name!r}: the patch registry is unavailable "
                                                 f"({self._shown(x, e)}); retry later", self.retry)
            self._remember(e, self.retry, err)
            raise err from None
        except DownloadRefused as x:
            err = PatchRefused(f"patch {e.name!r}: refused, the registry's file is not the one its manifest "
                               f"describes ({self._shown(x, e)})")
            self._remember(e, self.ttl, err)
            raise err from None
        with self._state:
            self._failures.pop(e.name, None)
        return patch

    def _remember(self, e: Entry, seconds: float, err: ReftError) -> None:
        with self._state:
            self._failures[e.name] = (e, time.monotonic() + seconds, err)

    def _shown(self, x: ReftError, e: Entry) -> str:
        return str(x).replace(redact(e.url), f"{e.name}{PATCH_SUFFIX}").replace(str(self.cache), "<cache>")

    def status(self) -> dict:
        """For /health: whether the last fetch worked, the manifest's size and age (no address)."""
        with self._state:
            n = None if self._entries is None else len(self._entries)
            age = time.monotonic() - self._good
            state = "unavailable" if self._failed else "not_fetched" if age == math.inf else "ok"
        return {"status": state, "patches": n, "age_s": round(age, 1) if age != math.inf else None,
                "fetches": self.fetches}
