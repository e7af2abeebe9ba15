"""Patches by name from one folder: validated once, kept in a bounded LRU, reloaded on change.

A name is a plain file stem (``alice`` -> ``DIR/alice.reft``): no separators,
no leading dot, nothing outside DIR (symlinks included).  Each lookup stats
the file; a changed file (size, mtime or inode) is validated again before it
is served, and a malformed one is refused without disturbing the others.
"""
from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from pathlib import Path

from edge_reft.errors import ReftError
from edge_reft.patch import BaseModel, Patch
from edge_reft.reftfile import load_patch
from edge_reft.spec import PATCH_NAME, PATCH_SUFFIX

NAME = re.compile(PATCH_NAME)


class PatchNameError(ReftError):
    """The name is not a plain patch name (traversal, absolute path, separators)."""


class PatchNotFound(ReftError):
    """No such patch in the folder."""


class PatchOutsideFolder(ReftError):
    """The name resolves (through a symlink) outside the patch folder."""


class PatchStore:
    def __init__(self, folder: str | os.PathLike[str], model: BaseModel, capacity: int = 256):
        self.folder = Path(folder).resolve()
        if not self.folder.is_dir():
            raise ReftError(f"{folder}: not a folder of patches")
        self.model, self.capacity = model, capacity
        self._items: OrderedDict[str, tuple[tuple[int, int, int], Patch]] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0  # validations done (for tests and /health)

    def path(self, name: str) -> Path:
        if not isinstance(name, str) or not NAME.match(name):
            raise PatchNameError(f"patch {name!r}: expected a plain name (letters, digits, '_', '-', '.'), "
                                 "not a path")
        p = self.folder / f"{name}{PATCH_SUFFIX}"
        real = Path(os.path.realpath(p))
        if real.parent != self.folder and self.folder not in real.parents:
            raise PatchOutsideFolder(f"patch {name!r}: resolves outside the patch folder")
        return real

    def get(self, name: str) -> Patch:
        path = self.path(name)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            with self._lock:
                self._items.pop(name, None)
            raise PatchNotFound(f"patch {name!r}: no such patch") from None
        stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
        with self._lock:
            hit = self._items.get(name)
            if hit is not None and hit[0] == stamp:
                self._items.move_to_end(name)
                return hit[1]
        patch = load_patch(path, model=self.model)  # outside the lock: validation takes a while
        with self._lock:
            self.loads += 1
            self._items[name] = (stamp, patch)
            self._items.move_to_end(name)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return patch

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.folder.glob(f"*{PATCH_SUFFIX}") if NAME.match(p.stem))

    def __len__(self) -> int:
        return len(self._items)
