"""Saved KV-cache states, one per patch set, for contexts that serve many users.

A context holds one sequence.  When the next request runs under other patches,
the engine saves what the context holds (llama.cpp's per-sequence state: the
cells' keys and values, a few hundred KB for a chat prompt on a small model)
and restores the state last computed under the new request's patches, so each
user's system prompt and conversation are resumed rather than recomputed.  The
saved state is the one its own patches computed, so the exact reuse rule
applies to it unchanged.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Generic, TypeVar

C = TypeVar("C")


class ArrayState:
    """A saved state made of numpy arrays (backends that hold their KV cache in numpy)."""

    def __init__(self, arrays: dict[str, Any], n: int):
        self.arrays, self.n = arrays, n

    def __len__(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


class SavedStates(Generic[C]):
    """Least recently used states within ``limit_bytes``, keyed by PatchSet key."""

    def __init__(self, limit_bytes: int):
        self.limit = max(0, int(limit_bytes))
        self._items: OrderedDict[str, tuple[C, Any]] = OrderedDict()
        self.nbytes = 0

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def put(self, key: str, cache: C, blob: Any) -> None:
        """Keep ``blob`` (len() bytes) for ``key``, replacing an older one; evict the least
        recently used beyond the limit (a blob larger than the limit is not kept)."""
        self.take(key)
        if len(blob) > self.limit:
            return
        self._items[key] = (cache, blob)
        self.nbytes += len(blob)
        while self.nbytes > self.limit:
            _, (_, old) = self._items.popitem(last=False)
            self.nbytes -= len(old)

    def take(self, key: str) -> tuple[C, Any] | None:
        item = self._items.pop(key, None)
        if item is not None:
            self.nbytes -= len(item[1])
        return item

    def clear(self) -> None:
        self._items.clear()
        self.nbytes = 0
