"""Which token positions an intervention edits: the one implementation.

Rules, in pyreft's terms: ``f<N>`` (first N prompt tokens), ``l<N>`` (last N
prompt tokens), ``f<N>+l<M>``, and ``all`` (every position, prompt and
generated).  With both f and l, each window is capped at floor(n/2) for a
prompt of n tokens, so the two never overlap (pyreft's rule); a window alone
is capped at n.  Prompt-scoped rules edit during prefill only.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import PositionError

_RULE = re.compile(r"^(?:f([1-9][0-9]{0,5}))?(\+)?(?:l([1-9][0-9]{0,5}))?$")


@dataclass(frozen=True)
class PositionRule:
    first: int = 0
    last: int = 0
    all: bool = False

    @classmethod
    def parse(cls, text: str) -> "PositionRule":
        """Parse ``f3``, ``l1``, ``f1+l1`` or ``all`` (strict: no spaces, no zero windows)."""
        if text == "all":
            return cls(all=True)
        m = _RULE.match(text) if isinstance(text, str) else None
        if not m or not (m.group(1) or m.group(3)) or bool(m.group(2)) != bool(m.group(1) and m.group(3)):
            raise PositionError(f"position rule {text!r}: expected 'f<N>', 'l<N>', 'f<N>+l<M>' "
                                "or 'all' with N, M >= 1 (e.g. 'l1', 'f1+l1')")
        return cls(first=int(m.group(1) or 0), last=int(m.group(3) or 0))

    def __str__(self) -> str:
        if self.all:
            return "all"
        parts = ([f"f{self.first}"] if self.first else []) + ([f"l{self.last}"] if self.last else [])
        return "+".join(parts)

    @property
    def prompt_scoped(self) -> bool:
        return not self.all

    def windows(self, n: int) -> tuple[int, int]:
        """(first, last) window sizes for a prompt of ``n`` tokens, after capping."""
        if n <= 0:
            raise PositionError(f"position rule {self}: the prompt is empty; a patch needs at "
                                "least one prompt token to edit")
        if self.all:
            return n, 0
        cap = n // 2 if (self.first and self.last) else n
        return min(self.first, cap), min(self.last, cap)

    def select(self, n: int) -> np.ndarray:
        """Sorted, unique prompt positions edited in a prompt of ``n`` tokens."""
        f, l = self.windows(n)
        return np.unique(np.concatenate([np.arange(f), np.arange(n - l, n)]).astype(np.int64))

    def mask(self, n: int) -> np.ndarray:
        """Boolean mask over the ``n`` prompt positions."""
        m = np.zeros(n, dtype=bool)
        m[self.select(n)] = True
        return m

    def first_edited(self, n: int) -> int:
        """The lowest edited prompt position (everything before it is patch-independent)."""
        return int(self.select(n)[0])


def edit_signature(rules: Sequence[PositionRule], n_prompt: int, n_total: int) -> np.ndarray:
    """Per position of a sequence, a bitmask of the interventions that edit it: a
    (n_total, words) uint64 array, bit ``i % 64`` of word ``i // 64`` for intervention ``i``.

    Positions ``< n_prompt`` are the prompt; later ones are generated tokens,
    edited only by ``all`` rules.  Two cached sequences can share a KV-cache
    prefix only where their signatures (and tokens) agree.  Rows have as many
    words as the set needs, so any set the format allows (``spec.MAX_INTERVENTIONS``
    per patch, patches stacked) has a signature: there is no runtime limit of its own.
    """
    words = max(1, (len(rules) + 63) // 64)
    sig = np.zeros((n_total, words), dtype=np.uint64)
    for i, rule in enumerate(rules):
        w, bit = divmod(i, 64)
        mask = np.uint64(1 << bit)
        if rule.all:
            sig[:, w] |= mask
        else:
            sig[rule.select(n_prompt), w] |= mask
    return sig


def _rows(sig: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` rows of a signature as (n, words) (a 1-D array is one word per row)."""
    s = np.asarray(sig)[:n]
    return s.reshape(len(s), -1)


def reusable_prefix(old_tokens: Sequence[int], old_sig: np.ndarray,
                    new_tokens: Sequence[int], new_sig: np.ndarray, same_edits: bool = True) -> int:
    """How many leading positions of a cached sequence a new one may keep.

    The KV cache of a position depends on the tokens and the edits at and
    before it, so the prefix ends at the first position where either differs
    (FORMAT.md's multi-turn rule: positions edited before but not now, or the
    reverse, are recomputed from the first such position).  Signatures name
    interventions by index within their own patch set, so when the sequences
    were edited by different sets (``same_edits=False``) the prefix also ends
    at the first position either edits: before it, both hold what no patch computes.
    """
    n = min(len(old_tokens), len(new_tokens), len(old_sig), len(new_sig))
    if n == 0:
        return 0
    a = np.asarray(old_tokens[:n], dtype=np.int64) != np.asarray(new_tokens[:n], dtype=np.int64)
    old, new = _rows(old_sig, n), _rows(new_sig, n)
    if old.shape[1] != new.shape[1]:  # sets of different sizes: compare on the wider rows
        w = max(old.shape[1], new.shape[1])
        old, new = (np.pad(x, ((0, 0), (0, w - x.shape[1]))) for x in (old, new))
    diff = a | (old != new).any(axis=1)
    if not same_edits:
        diff |= old.any(axis=1) | new.any(axis=1)
    hits = np.flatnonzero(diff)
    return int(hits[0]) if hits.size else n
