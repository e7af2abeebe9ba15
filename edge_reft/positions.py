"""Which token positions an intervention edits: the one implementation.

Rules, in pyreft's terms, for a prompt of n tokens:

- ``f<N>`` / ``l<N>``: the first / last min(N, n) prompt tokens;
- ``f<N>+l<M>``: both windows, each capped at floor(n/2), so they never overlap
  (pyreft's rule).  Format 2 lets one side be 0: ``f0+l<M>`` is pyreft's own
  reading of ``l<M>`` (get_intervention_locations caps a lone window at
  floor(n/2) too), and an untied pyreft f+l pair is ``f<N>+l0`` and ``f0+l<M>``;
- a ``:-K`` suffix (format 2) ends the windows K tokens before the prompt's end:
  the rule is applied to the first n - K tokens (pyreft's ReftSupervisedDataset
  and its siblings use ``last_position = n - 1``, i.e. ``:-1``);
- ``all``: every position, prompt and generated.

Prompt-scoped rules edit during prefill only.  A rule may select nothing in a
short prompt (``f0+l1`` of one token); an empty prompt is an error.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import PositionError

_N = r"(0|[1-9][0-9]{0,5})"
_RULE = re.compile(rf"\A(?:f{_N})?(\+)?(?:l{_N})?(?::-([1-9][0-9]{{0,5}}))?\Z")


@dataclass(frozen=True)
class PositionRule:
    first: int = 0
    last: int = 0
    all: bool = False
    paired: bool = False   # written f<N>+l<M>: every window capped at floor(n/2)
    end: int = 0           # the windows end this many tokens before the prompt's end

    def __post_init__(self) -> None:
        if not self.paired and not self.all:  # a lone window or both: pair them as pyreft does
            object.__setattr__(self, "paired", bool(self.first and self.last))

    @classmethod
    def parse(cls, text: str) -> "PositionRule":
        """Parse ``f3``, ``l1``, ``f1+l1``, ``f0+l4``, ``l1:-1`` or ``all`` (strict: no spaces)."""
        if text == "all":
            return cls(all=True)
        m = _RULE.match(text) if isinstance(text, str) else None
        ok = m is not None and (m.group(1) is not None or m.group(3) is not None)
        if ok:
            paired = bool(m.group(2))
            f, l = int(m.group(1) or 0), int(m.group(3) or 0)
            ok = (paired == (m.group(1) is not None and m.group(3) is not None)
                  and (f or l) and (paired or (f if m.group(1) else l)))
        if not ok:
            raise PositionError(
                f"position rule {str(text)[:80]!r}: expected 'f<N>', 'l<N>', 'f<N>+l<M>' or 'all' "
                "(N, M >= 1; in f<N>+l<M> one of them may be 0), optionally followed by ':-K' to end "
                "the windows K tokens before the prompt's end (e.g. 'l1', 'f1+l1', 'f0+l4', 'l1:-1')")
        return cls(first=f, last=l, paired=paired, end=int(m.group(4) or 0))

    def __str__(self) -> str:
        if self.all:
            return "all"
        text = f"f{self.first}+l{self.last}" if self.paired else (
            f"f{self.first}" if self.first else f"l{self.last}")
        return text + (f":-{self.end}" if self.end else "")

    @property
    def version(self) -> int:
        """The first `.reft` format version that can state this rule."""
        return 2 if self.end or (self.paired and not (self.first and self.last)) else 1

    @property
    def prompt_scoped(self) -> bool:
        return not self.all

    def describe(self) -> str:
        """The rule in words, for ``inspect``."""
        if self.all:
            return "every position, prompt and generated"
        span = "prompt" if not self.end else f"prompt less its last {self.end}"
        parts = ([f"first {self.first}"] if self.first else []) + ([f"last {self.last}"] if self.last else [])
        cap = "each capped at floor(n/2)" if self.paired else "capped at n"
        return f"{' and '.join(parts)} tokens of the {span}, {cap}"

    def windows(self, n: int) -> tuple[int, int]:
        """(first, last) window sizes for a prompt of ``n`` tokens, after capping."""
        if n <= 0:
            raise PositionError(f"position rule {self}: the prompt is empty; a patch needs at "
                                "least one prompt token to edit")
        if self.all:
            return n, 0
        m = max(n - self.end, 0)
        cap = m // 2 if self.paired else m
        return min(self.first, cap), min(self.last, cap)

    def select(self, n: int) -> np.ndarray:
        """Sorted, unique prompt positions edited in a prompt of ``n`` tokens (maybe none)."""
        f, l = self.windows(n)
        m = n if self.all else max(n - self.end, 0)
        return np.unique(np.concatenate([np.arange(f), np.arange(m - l, m)]).astype(np.int64))

    def mask(self, n: int) -> np.ndarray:
        """Boolean mask over the ``n`` prompt positions."""
        m = np.zeros(n, dtype=bool)
        m[self.select(n)] = True
        return m

    def first_edited(self, n: int) -> int:
        """The lowest edited prompt position, ``n`` if none (everything before it is
        patch-independent)."""
        sel = self.select(n)
        return int(sel[0]) if sel.size else n


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
