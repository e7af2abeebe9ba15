"""Each file act edge-reft repeats, written once: atomic writes, sha256 of a file, opening
only regular files.

Every writer in the tree (patches, checkpoints, pulled files, converted
folders, dequantized models, ONNX exports) goes through ``atomic_path`` /
``atomic_dir`` / ``publish``: a temporary in the target's folder, fsynced,
given the mode the umask asks for, renamed over the target, and the folder
fsynced, so a crash leaves either the old file or the new one, never half.
Core module: imports nothing from edge-reft but ``errors``.
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

from .errors import ReftError


def umask() -> int:
    """The process umask (read from /proc where it can be, so no thread sees umask 0)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Make a rename inside ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(os.fspath(folder) or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: str | os.PathLike[str], target: str | os.PathLike[str], mode: int | None = None) -> Path:
    """Move a finished temporary file over ``target``: fsync, chmod (umask), rename, fsync the folder."""
    tmp, target = Path(tmp), Path(target)
    _fsync_file(tmp)
    os.chmod(tmp, (0o666 & ~umask()) if mode is None else mode)
    os.replace(tmp, target)
    fsync_dir(target.parent)
    return target


def _temp_name(target: Path, suffix: str) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    return Path(name)


@contextmanager
def atomic_path(target: str | os.PathLike[str], suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success it replaces ``target`` durably,
    on any exception it is removed and ``target`` is untouched."""
    target = Path(target)
    tmp = _temp_name(target, suffix)
    try:
        yield tmp
        publish(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(target: str | os.PathLike[str], mode: str = "wb", **kw) -> Iterator[IO]:
    """``open(target, mode)`` through ``atomic_path``."""
    with atomic_path(target) as tmp:
        with open(tmp, mode, **kw) as f:
            yield f


def write_bytes(target: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_open(target, "wb") as f:
        f.write(data)
    return Path(target)


def write_text(target: str | os.PathLike[str], text: str) -> Path:
    return write_bytes(target, text.encode("utf-8"))


@contextmanager
def atomic_dir(target: str | os.PathLike[str], replace: bool = False) -> Iterator[Path]:
    """Yield a new temporary folder next to ``target``; on success its files are fsynced and it
    takes ``target``'s place (an existing ``target`` only with ``replace``, removed after)."""
    target = Path(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    old: Path | None = None
    try:
        yield tmp
        mode = 0o777 & ~umask()
        for root, dirs, files in os.walk(tmp):
            for name in files:
                _fsync_file(Path(root) / name)
            fsync_dir(root)
        os.chmod(tmp, mode)
        if target.exists() or target.is_symlink():
            if not replace:
                raise ReftError(f"{target}: exists; not replaced")
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, old / "x")
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / "x").exists() and not target.exists():
            os.replace(old / "x", target)  # put the previous version back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def open_regular(path: str | os.PathLike[str], *, nofollow: bool = False) -> int:
    """A read-only descriptor of ``path``, refused unless it is a regular file: a FIFO, device
    or folder is never opened in a blocking way (and with ``nofollow`` not a symlink either)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    if nofollow:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(os.fspath(path), flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, f"not a regular file ({file_kind(st.st_mode)})")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symlink")):
        if test(mode):
            return name
    return "not a plain file"


def lock_file(entry: str | os.PathLike[str]) -> Path:
    """The lock file that guards the cache entry ``entry``: ``.NAME.lock`` beside it (one
    naming rule for whoever builds an entry and whoever clears it)."""
    entry = Path(entry)
    return entry.parent / f".{entry.name}.lock"


def is_lock_file(path: str | os.PathLike[str]) -> bool:
    name = Path(path).name
    return name.startswith(".") and name.endswith(".lock")


@contextmanager
def locked(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (made if missing) across processes:
    ``flock`` on POSIX, ``msvcrt.locking`` on Windows; released when the block ends or the
    process dies, so a crashed holder never leaves it locked."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if os.name == "nt":  # pragma: no cover - Windows
            import msvcrt
            while True:
                try:
                    msvcrt.locking(fd, msvcrt.LK_LOCK, 1)
                    break
                except OSError:  # LK_LOCK gives up after ~10 s; keep waiting
                    continue
        else:
            import fcntl
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def tree_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of the regular files under ``path`` (symlinks not followed)."""
    total = 0
    for root, _, names in os.walk(path):
        for n in names:
            try:
                st = os.lstat(os.path.join(root, n))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def sha256_file(path: str | os.PathLike[str], into: Any = None) -> str:
    """Hex sha256 of a file's bytes, read in blocks (regular files only); with ``into``
    (a hashlib object) the bytes extend that running hash and its hex digest is returned."""
    h = hashlib.sha256() if into is None else into
    with os.fdopen(open_regular(path), "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
