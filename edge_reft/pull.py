"""Fetch a patch into the per-user cache: resumable, size-capped, verified, atomic.

``pull(url, sha256)`` downloads to ``<cache>/patches/<name>.reft.part``
(resuming with an HTTP Range request when a part is there), refuses more
than the size cap, checks the sha256, then validates the file as a patch
(and against a base model when given) before renaming it into place.  Once
pulled, a patch is used offline by name: ``edge-reft run --patch alice``.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import urllib.error
import urllib.request
from pathlib import Path

from .errors import ReftError
from .models import cache_dir
from .patch import BaseModel
from .reftfile import load_patch
from .spec import DEFAULT_MAX_BYTES, PATCH_NAME, PATCH_SUFFIX

NAME = re.compile(PATCH_NAME)


def patches_dir() -> Path:
    return cache_dir() / "patches"


def resolve(ref: str | os.PathLike[str]) -> Path:
    """A patch argument: an existing path, or the name of a pulled patch."""
    p = Path(ref)
    if p.exists() or not NAME.match(str(ref)):
        return p
    cached = patches_dir() / f"{ref}{PATCH_SUFFIX}"
    if cached.exists():
        return cached
    raise ReftError(f"patch {str(ref)!r}: no such file, and no pulled patch of that name in {patches_dir()}")


def pull(source: str, sha256: str, name: str | None = None, base: BaseModel | None = None,
         max_bytes: int = DEFAULT_MAX_BYTES, timeout: float = 30.0, folder: Path | None = None) -> Path:
    """Download (or copy) ``source`` to the cache as ``name``.reft; return its path."""
    want = sha256.lower()
    if not re.fullmatch(r"[0-9a-f]{64}", want):
        raise ReftError(f"--sha256: {sha256!r} is not 64 hex digits")
    name = name or Path(source.split("?")[0].rstrip("/")).name.removesuffix(PATCH_SUFFIX)
    if not NAME.match(name):
        raise ReftError(f"--name: {name!r} is not a plain patch name (letters, digits, '_', '-', '.')")
    folder = folder or patches_dir()
    folder.mkdir(parents=True, exist_ok=True)
    final, part = folder / f"{name}{PATCH_SUFFIX}", folder / f"{name}{PATCH_SUFFIX}.part"
    if final.exists() and _sha256(final) == want:
        return final
    if re.match(r"^https?://", source):
        _download(source, part, max_bytes, timeout)
    else:
        src = Path(source.removeprefix("file://"))
        if not src.is_file():
            raise ReftError(f"{source}: no such file")
        if src.stat().st_size > max_bytes:
            raise ReftError(f"{source}: {src.stat().st_size} bytes exceeds the limit of {max_bytes}")
        shutil.copyfile(src, part)
    got = _sha256(part)
    if got != want:
        part.unlink()
        raise ReftError(f"{source}: sha256 is {got}, expected {want}; nothing was kept")
    try:
        load_patch(part, model=base, max_bytes=max_bytes)
    except ReftError:
        part.unlink()
        raise
    with open(part, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(part, final)
    return final


def _download(url: str, part: Path, max_bytes: int, timeout: float) -> None:
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the part is already whole
            return
        raise ReftError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise ReftError(f"{url}: cannot download ({getattr(e, 'reason', e)})") from None
    with resp:
        if resp.status != 206:
            have = 0  # the server sent the whole file: start over
        length = resp.headers.get("Content-Length")
        expected = have + int(length) if length is not None and length.isdigit() else None
        if expected is not None and expected > max_bytes:
            raise ReftError(f"{url}: {expected} bytes exceeds the limit of {max_bytes}")
        total = have
        with open(part, "ab" if have else "wb") as f:
            try:
                while block := resp.read(1 << 16):
                    total += len(block)
                    if total > max_bytes:
                        f.close()
                        part.unlink()
                        raise ReftError(f"{url}: more than the limit of {max_bytes} bytes; nothing was kept")
                    f.write(block)
            except (OSError, http.client.HTTPException):
                pass  # a dropped connection: what arrived is kept for the next try
        if expected is not None and total < expected:
            raise ReftError(f"{url}: the download stopped at {total} of {expected} bytes; run the same "
                            "pull again to resume it")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
