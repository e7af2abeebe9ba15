"""Continuous batching: many requests, each with its own patches, decoded together.

An engine with ``slots`` sequences (``Engine(model, slots=S)``) holds one KV
cache for all of them.  ``Batcher.step`` makes one forward pass of at most
``n_ubatch`` tokens: first the next token of every slot that is generating,
then prompt chunks of slots still reading their prompt (llama-server's order:
decoding never waits behind a long prompt).  Each segment carries its own
sequence's patches, so one pass edits row i with the patch of the request that
row belongs to, and rows of requests without a patch are left alone.

Slots and KV state.  A slot keeps what its sequence last computed after its
request ends.  A new request goes to the free slot whose cache it may reuse
most under the exact rule (FORMAT.md, "Positions"; ``engine._shared``); if
another slot, free or busy, holds a longer reusable prefix, the slot takes
those cells from it (``_copy``: copied, not recomputed): under other patches
that is only positions neither patch set edits, so a chat template's system
turn is computed once for every user whose patch edits the last tokens.  The
engine's saved states (kvstates) work per slot as they do for one sequence.

Numbers: a request's answer does not depend on what else is in the batch, bit
for bit (tests/test_batching.py).  Each sequence has a KV stream of its own,
its cells in position order from cell 0 as in a context of its own (in one
shared stream they land wherever others left room, and the attention's sums
round differently: up to 0.5 logits measured on SmolLM2 Q4_1, enough to flip
greedy answers), and llama.cpp's matmuls give each row what they give it in
any batch of two or more rows.  The price: llama.cpp's split of a batch into
ubatches is "equal" with one stream per sequence (as many tokens of each of
consecutive sequences), so a step's prompt chunks run as ubatches of their
own beside the one that decodes every generating slot.

Threads: ``submit`` and ``cancel`` from any thread; ``step`` from one (the
server's batch thread, or ``run_all`` in the caller's).  Callbacks run in the
stepping thread and must not block.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from edge_reft.errors import ReftError

from .edits import PatchSet
from .engine import Completion, EngineBase, Reply, Segment, _Cache, _shared
from .sampling import SamplingParams


@dataclass(eq=False)
class Request:
    """One generation for the batcher.  ``on_piece(text)`` as text arrives, then exactly one
    of ``on_done(Completion)`` or ``on_error(exception)``."""
    tokens: list[int]
    pset: PatchSet
    sampling: SamplingParams
    max_tokens: int
    stop: Sequence[str] = ()
    cache: str = "exact"
    on_piece: Callable[[str], None] = lambda text: None
    on_done: Callable[[Completion], None] = lambda c: None
    on_error: Callable[[BaseException], None] = lambda e: None
    cancelled: bool = False
    # the batcher's
    done: int = 0                 # prompt tokens in the KV cache
    reused: int = 0
    reply: Reply | None = None
    next_token: int = -1          # sampled, to be fed in the next step
    t0: float = 0.0
    t1: float = 0.0


@dataclass
class _Slot:
    seq: int
    request: Request | None = None


@dataclass
class _Stats:
    copied: int = 0               # prompt tokens taken from another slot's cells
    reused: int = 0               # prompt tokens kept in the slot's own cache


class Batcher:
    """The slots of one engine and the requests waiting for them."""

    def __init__(self, engine: EngineBase):
        self.engine = engine
        self.slots = [_Slot(i) for i in range(engine.n_seq)]
        self.waiting: deque[Request] = deque()
        self.stats = _Stats()
        self._cv = threading.Condition()

    # ---- any thread ---------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        """Queue ``req`` (made by ``make_request``)."""
        with self._cv:
            req.t0 = time.perf_counter()
            self.waiting.append(req)
            self._cv.notify_all()

    def cancel(self, req: Request) -> None:
        """Stop ``req`` before its next token (its slot is freed at the next step); one still
        waiting leaves the queue at once."""
        req.cancelled = True
        with self._cv:
            if req in self.waiting:
                self.waiting.remove(req)
                self._cancelled_waiting(req)
            self._cv.notify_all()

    @property
    def active(self) -> int:
        return sum(1 for s in self.slots if s.request is not None)

    @property
    def n_waiting(self) -> int:
        return len(self.waiting)

    def wait_for_work(self, timeout: float | None = None) -> None:
        with self._cv:
            if not self.waiting and not self.active:
                self._cv.wait(timeout)

    def wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    # ---- the stepping thread ---------------------------------------------------------------
    def run_all(self) -> None:
        """Step until nothing is active or waiting."""
        while self.step():
            pass

    def step(self) -> bool:
        """Admit what fits, run one forward pass; False when there was nothing to do."""
        for s in self.slots:
            if s.request is not None and s.request.cancelled:
                self._finish(s, "cancelled")
        self._admit()
        plan = self._plan()
        if not plan:
            return False
        segments = [seg for _, seg in plan]
        try:
            logits = self.engine._forward_batch(segments)
        except BaseException as e:  # the rows of this pass are not trustworthy: drop those sequences
            for s, _ in plan:
                self._fail(s, e)
            if not isinstance(e, Exception):
                raise
            return True
        for (s, seg), row in zip(plan, logits):
            self._advance(s, seg, row)
        return True

    def _admit(self) -> None:
        while True:
            free = [s for s in self.slots if s.request is None]
            with self._cv:
                while self.waiting and self.waiting[0].cancelled:
                    self._cancelled_waiting(self.waiting.popleft())
                if not free or not self.waiting:
                    return
                req = self.waiting.popleft()
            try:
                self._place(req, free)
            except Exception as e:
                req.on_error(e)

    def _cancelled_waiting(self, req: Request) -> None:
        reply = Reply(self.engine, req.sampling, req.stop)
        reply.finish = "cancelled"
        req.on_done(reply.completion(req.tokens, 0.0, 0.0, 0))

    def _place(self, req: Request, free: list[_Slot]) -> None:
        """Give ``req`` the free slot it can reuse most of, and cells of any slot that shares more."""
        eng, toks = self.engine, req.tokens
        caches = eng._caches
        # the most reusable; among equals the lowest sequence, so the generating slots stay
        # consecutive (one ubatch decodes a run of consecutive sequences: see the module doc)
        slot = max(free, key=lambda s: (_shared(caches[s.seq], toks, req.pset, req.cache), -s.seq))
        n = eng._prefix_to_keep(toks, req.pset, req.cache, slot.seq)
        if req.cache != "off":
            best, src = n, None
            for other in self.slots:
                if other is not slot and caches[other.seq].tokens and not _filling(other):
                    m = eng._reusable(_shared(caches[other.seq], toks, req.pset, req.cache), toks,
                                      caches[other.seq], req.cache)
                    if m > best:
                        best, src = m, other
            if src is not None:
                eng._copy(src.seq, slot.seq, best)
                self.stats.copied += best
                n = best
            else:
                self.stats.reused += n
        caches[slot.seq] = _Cache()  # until the prompt is in, the sequence matches nothing
        req.done = req.reused = n
        req.reply = Reply(eng, req.sampling, req.stop)
        slot.request = req

    def _plan(self) -> list[tuple[_Slot, Segment]]:
        """This pass's segments: one token of each generating slot, then prompt chunks."""
        budget = self.engine.n_ubatch
        plan = []
        for s in self.slots:
            r = s.request
            if r is not None and r.done == len(r.tokens):
                plan.append((s, Segment(s.seq, [r.next_token], len(r.tokens) + len(r.reply.tokens) - 1,
                                        len(r.tokens), r.pset, True)))
                budget -= 1
        for s in sorted((s for s in self.slots if _filling(s)), key=lambda s: s.request.t0):
            if budget <= 0:
                break
            r = s.request
            m = min(len(r.tokens) - r.done, budget)
            if len(r.tokens) - r.done - m == 1 and m > 2:
                m -= 1  # never leave a last chunk of one token (see engine.MIN_RECOMPUTED)
            plan.append((s, Segment(s.seq, r.tokens[r.done:r.done + m], r.done, len(r.tokens), r.pset,
                                    r.done + m == len(r.tokens))))
            budget -= m
        return sorted(plan, key=lambda p: p[0].seq)

    def _advance(self, s: _Slot, seg: Segment, logits: np.ndarray | None) -> None:
        r = s.request
        eng = self.engine
        if r.done < len(r.tokens):  # a prompt chunk
            r.done += len(seg.tokens)
            if logits is None:
                return
            eng._caches[s.seq] = _Cache(r.pset, list(r.tokens), len(r.tokens))
            r.t1 = time.perf_counter()
            if r.max_tokens == 0:
                return self._finish(s)
        else:
            eng._caches[s.seq].tokens.append(r.next_token)
        try:
            tok, piece = r.reply.step(logits)
            if piece:
                r.on_piece(piece)
        except Exception as e:
            return self._fail(s, e)
        if r.reply.done or len(r.reply.tokens) >= r.max_tokens:
            return self._finish(s)
        r.next_token = tok

    def _finish(self, s: _Slot, reason: str | None = None) -> None:
        r, s.request = s.request, None
        if reason is not None:
            r.reply.finish = reason
        if r.done < len(r.tokens):  # cancelled in its prompt: the cells hold part of it
            self.engine._caches[s.seq] = _Cache()
        tail = r.reply.text.close() if reason is None else ""
        if tail:
            r.on_piece(tail)
        t1 = r.t1 or time.perf_counter()
        r.on_done(r.reply.completion(r.tokens, t1 - r.t0, time.perf_counter() - t1, r.reused))

    def _fail(self, s: _Slot, e: BaseException) -> None:
        r, s.request = s.request, None
        self.engine._caches[s.seq] = _Cache()
        self.engine._keep(0, s.seq)
        r.on_error(e)


def _filling(s: _Slot) -> bool:
    return s.request is not None and s.request.done < len(s.request.tokens)


def make_request(engine: EngineBase, prompt: str | None = None, *, messages: Sequence[dict] | None = None,
                 patch: Any = None, max_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, stop: Sequence[str] = (), raw: bool = False,
                 cache: str = "exact", prompt_tokens: Sequence[int] | None = None, **sampling: float) -> Request:
    """A generation's keywords (``EngineBase.generate``'s) checked and bound to ``engine``: the
    prompt tokenized, the patches bound, the sampling parameters checked, the length checked
    against a sequence's context.  Every way in (generate, generate_many, the server) uses it."""
    from .engine import CACHE_MODES
    from .sampling import sampling_params
    if cache not in CACHE_MODES:
        raise ReftError(f"cache: {cache!r}, expected one of {CACHE_MODES}")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
        raise ReftError(f"max_tokens: {max_tokens!r}, expected an integer >= 0")
    params = sampling_params(temperature, top_p, top_k, seed, **sampling)
    pset = engine.patch_set(patch)
    toks = list(prompt_tokens) if prompt_tokens is not None else engine.prompt_tokens(prompt, messages, raw)
    if len(toks) + max_tokens > engine.n_ctx:
        raise ReftError(f"the prompt ({len(toks)} tokens) plus max_tokens ({max_tokens}) exceeds the "
                        f"context of {engine.n_ctx} tokens; raise n_ctx (--ctx) or shorten the prompt")
    return Request(toks, pset, params, max_tokens, tuple(stop), cache)


def generate_many(engine: EngineBase, requests: Sequence[dict[str, Any]]) -> list[Completion]:
    """Each dict holds ``generate``'s keywords; the replies in order (see EngineBase.generate_many).
    Every request is checked before any runs; one that fails while running raises after all end."""
    out: list[Completion | BaseException | None] = [None] * len(requests)
    batcher = Batcher(engine)
    reqs = []
    for i, kw in enumerate(requests):
        try:
            reqs.append(make_request(engine, **kw))
        except ReftError as e:  # its own class kept (a ReftFormatError's problems, ...), the request named
            e.args = (f"request {i}: {e}",)
            raise
    for i, req in enumerate(reqs):
        req.on_done = req.on_error = lambda result, i=i: out.__setitem__(i, result)
        batcher.submit(req)
    with engine._exclusive():
        batcher.run_all()
    for r in out:
        if isinstance(r, BaseException):
            raise r
    return out  # type: ignore[return-value]
