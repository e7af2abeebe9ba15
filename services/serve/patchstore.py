"""Patches by name from one folder (and a registry): validated and bound to the model once,
kept in a bounded LRU, reloaded on change.

A name is a plain file stem (``alice`` -> ``DIR/alice.reft``): no separators,
no leading dot, nothing outside DIR (symlinks included), and only a regular
file (a FIFO, device or folder named ``x.reft`` is refused without opening it
in a blocking way).  Each lookup stats the file; a changed file (size, mtime or
inode) is validated again before it is served.  Failures are cached too, under
the same stamp, so a client naming a large invalid patch again and again costs
one validation, and concurrent lookups of one name wait for a single load.
Errors name the patch (``alice.reft``), never the server's folder.

With a registry (``registry.py``: a manifest of URLs and sha256s) a name that is not in
the folder is pulled from it on first use into a cache folder and then served like a
local patch; the folder wins when both have a name.  ``names``/``exists`` (what
/v1/models lists) cover the folder only: a registry may list thousands.

Memory: the LRU keeps at most ``capacity`` bound PatchSets besides the pinned ones
(``pin``: loaded at start-up, never evicted; a pinned name that cannot be loaded is a
start-up error).  A PatchSet holds, per intervention of rank r on a model of width d,
R, W and B (W - R for LoReFT; r x d float32 each) and b: ``PatchSet.nbytes``, summed in ``nbytes``.
Measured on SmolLM2-135M (d = 576): a one-intervention rank-4 patch, ``l1`` or ``f1+l1``
(a 19.3 KB file), holds 27 664 bytes of arrays and keeps about 30 KB alive with its Python
objects (tracemalloc over 100 loads and binds); an ``l1`` + ``f1+l1`` patch 55 328 bytes,
about 59 KB.  The default 256 entries so hold about 7.7 MB of one-layer rank-4 patches.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterable, Iterator

from edge_reft.errors import PatchMismatchError, ReftError, ReftFormatError
from edge_reft.files import file_kind
from edge_reft.patch import Patch
from edge_reft.reftfile import load_patch
from edge_reft.runtime import PatchSet
from edge_reft.spec import PATCH_NAME, PATCH_SUFFIX

from .registry import PatchRefused, Registry, RegistryUnavailable

NAME = re.compile(PATCH_NAME)
Stamp = tuple  # a file's (size, mtime_ns, inode), or a registry entry's ("registry", url, sha256)


class PatchNameError(ReftError):
    """The name is not a plain patch name (traversal, absolute path, separators)."""


class PatchNotFound(ReftError):
    """No such patch in the folder (or none this client may use)."""


class PatchOutsideFolder(ReftError):
    """The name resolves (through a symlink) outside the patch folder."""


class PatchUnreadable(ReftError):
    """The name is a FIFO, a device, a folder, a symlink loop: not a patch file."""


class PatchStore:
    """``bind`` turns a loaded patch into the PatchSet requests run with (an engine's
    ``patch_set``: the base-model check, a backend's own checks, the compiled edits), once
    per file version; engines of one model share the result."""

    def __init__(self, folder: str | os.PathLike[str], bind: Callable[[Patch], PatchSet], capacity: int = 256,
                 registry: Registry | None = None, pin: Iterable[str] = ()):
        self.folder = Path(folder).resolve()
        if not self.folder.is_dir():
            raise ReftError(f"{folder}: not a folder of patches")
        if capacity < 0:
            raise ReftError(f"--patch-cache {capacity}: expected an integer >= 0 (patches kept bound)")
        self.bind, self.capacity, self.registry = bind, capacity, registry
        self.pinned = frozenset(pin)
        self._items: OrderedDict[str, tuple[Stamp, PatchSet | ReftError]] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self.loads = 0  # validations done (for tests and /health)
        self.nbytes = 0  # array bytes of the PatchSets kept
        problems = []
        for name in sorted(self.pinned):
            try:
                self.get(name)
            except ReftError as e:
                problems.append(f"--pin {name}: cannot be loaded: {e}")
        if problems:
            raise ReftError("; ".join(problems))

    def path(self, name: str) -> Path:
        """The real path of patch ``name``, inside the folder; refuses anything else."""
        if not isinstance(name, str) or not NAME.match(name):
            raise PatchNameError(f"patch {name!r:.80}: expected a plain name (letters, digits, '_', "
                                 "'-', '.'), not a path")
        p = self.folder / f"{name}{PATCH_SUFFIX}"
        try:
            real = Path(os.path.realpath(p, strict=True))
        except FileNotFoundError:
            raise PatchNotFound(f"patch {name!r}: no such patch") from None
        except OSError as e:  # ELOOP, EACCES, ENOTDIR: not something a client can fix by retrying
            why = "a symlink loop" if e.errno == errno.ELOOP else (e.strerror or "cannot be resolved")
            raise PatchUnreadable(f"patch {name!r}: {name}{PATCH_SUFFIX} cannot be opened ({why})") from None
        if real.parent != self.folder and self.folder not in real.parents:
            raise PatchOutsideFolder(f"patch {name!r}: resolves outside the patch folder")
        return real

    def _stat(self, name: str) -> tuple[Path, Stamp]:
        path = self.path(name)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            with self._lock:
                gone = self._items.pop(name, None)
                self.nbytes -= _nbytes(gone[1]) if gone else 0
            raise PatchNotFound(f"patch {name!r}: no such patch") from None
        except OSError as e:
            raise PatchUnreadable(f"patch {name!r}: cannot be opened ({e.strerror})") from None
        if not stat.S_ISREG(st.st_mode):
            raise PatchUnreadable(f"patch {name!r}: {name}{PATCH_SUFFIX} is {file_kind(st.st_mode)}, "
                                  "expected a regular file")
        return path, (st.st_size, st.st_mtime_ns, st.st_ino)

    def _cached(self, name: str, stamp: Stamp) -> PatchSet | None:
        with self._lock:
            hit = self._items.get(name)
            if hit is None or hit[0] != stamp:
                return None
            self._items.move_to_end(name)
        if isinstance(hit[1], ReftError):
            raise hit[1].with_traceback(None)  # a fresh traceback: a cached error must not grow one
        return hit[1]

    def get(self, name: str) -> PatchSet:
        """The patch ``name``, validated and bound (blocking: call it off the event loop)."""
        try:
            path, stamp = self._stat(name)
        except PatchNotFound:
            if self.registry is None:
                raise
            return self._remote(name)
        hit = self._cached(name, stamp)
        if hit is not None:
            return hit
        with self._gate(name):  # one load per name at a time; the others find its result
            path, stamp = self._stat(name)
            hit = self._cached(name, stamp)
            if hit is not None:
                return hit
            try:
                result: PatchSet | ReftError = self.bind(load_patch(path))
            except ReftError as e:
                result = _named(e, name, path)
            self._keep(name, stamp, result)
        if isinstance(result, ReftError):
            raise result.with_traceback(None)
        return result

    def _remote(self, name: str) -> PatchSet:
        """Patch ``name`` from the registry: one pull per name however many ask at once; a
        registry that cannot be reached is not cached here (the registry remembers it)."""
        entry = self.registry.entry(name)
        if entry is None:
            raise PatchNotFound(f"patch {name!r}: no such patch")
        stamp = ("registry", entry.url, entry.sha256)
        hit = self._cached(name, stamp)
        if hit is not None:
            return hit
        with self._gate(name):
            hit = self._cached(name, stamp)
            if hit is not None:
                return hit
            final = self.registry.file(name)
            try:
                result: PatchSet | ReftError = self.bind(self.registry.patch(entry))
            except (RegistryUnavailable, PatchRefused):
                raise  # not a property of this entry's bytes: the registry remembers it for a while
            except ReftError as e:
                result = _named(e, name, final.with_name(final.name + ".part"), final)
            self._keep(name, stamp, result)
        if isinstance(result, ReftError):
            raise result.with_traceback(None)
        return result

    @contextlib.contextmanager
    def _gate(self, name: str) -> Iterator[None]:
        with self._lock:
            gate = self._loading.setdefault(name, threading.Lock())
        try:
            with gate:
                yield
        finally:
            with self._lock:
                if self._loading.get(name) is gate and not gate.locked():
                    self._loading.pop(name, None)

    def _keep(self, name: str, stamp: Stamp, result: PatchSet | ReftError) -> None:
        """Cache a load's result; evict the least recently used unpinned ones over capacity."""
        with self._lock:
            self.loads += 1
            old = self._items.pop(name, None)
            self.nbytes += _nbytes(result) - (_nbytes(old[1]) if old else 0)
            self._items[name] = (stamp, result)
            unpinned = [k for k in self._items if k not in self.pinned]
            for k in unpinned[:max(0, len(unpinned) - self.capacity)]:
                self.nbytes -= _nbytes(self._items.pop(k)[1])

    def get_many(self, names: list[str]) -> PatchSet:
        """Patches stacked in the order given, bound as one PatchSet (one name: ``get``)."""
        sets = [self.get(n) for n in names]
        if len(sets) == 1:
            return sets[0]
        return self.bind([p for s in sets for p in s.patches])

    def exists(self, name: str) -> bool:
        """Whether ``name`` is a patch a client may ask for (the rule ``names`` lists by)."""
        try:
            self._stat(name)
        except ReftError:
            return False
        return True

    def names(self, allowed=None) -> list[str]:
        """Names a client may ask for: regular ``.reft`` files that resolve inside the folder
        (no symlink out of it, no FIFO), filtered by ``allowed(name)`` when given."""
        out = []
        with os.scandir(self.folder) as it:
            for entry in it:
                name = entry.name[:-len(PATCH_SUFFIX)]
                if not entry.name.endswith(PATCH_SUFFIX) or not NAME.match(name):
                    continue
                if (allowed is None or allowed(name)) and self.exists(name):
                    out.append(name)
        return sorted(out)

    def __len__(self) -> int:
        return len(self._items)


def _nbytes(result: PatchSet | ReftError) -> int:
    return getattr(result, "nbytes", 0)


def _named(e: ReftError, name: str, *paths: Path) -> ReftError:
    """``e`` with the server's paths of the file replaced by the patch's file name."""
    shown = f"{name}{PATCH_SUFFIX}"

    def clean(text: str) -> str:
        for path in paths:
            text = text.replace(str(path), shown)
        return text
    if isinstance(e, ReftFormatError):
        return ReftFormatError(shown, [clean(q) for q in e.problems])
    cls = type(e) if isinstance(e, PatchMismatchError) else ReftError
    return cls(clean(str(e)))
