"""The engine interface and the generate loop every backend shares.

A backend implements four primitives: ``_tokenize``, ``_piece``,
``_forward`` (run a chunk of tokens at given positions, with the edits of a
``PatchSet``, and return logits) and ``_keep`` (cut the KV cache back).
A backend whose context holds several sequences (``n_seq``, the slots that
runtime/batching.py decodes together) also implements ``_forward_batch`` and
``_copy``, and its ``_keep``/``_save_state``/``_load_state`` take the sequence.
Everything else lives here once: chat template, patch binding, the
KV-cache reuse rule of FORMAT.md ("Positions"), sampling, stop strings, streaming.

Threading: an engine owns one context and serializes generations with a
lock; use one engine per thread for parallelism.  A streamed generation holds
the lock while it runs; one its own thread leaves unfinished (a ``break`` out
of the loop, the Generation kept) is closed when that thread calls the engine
again (finish_reason "cancelled"), so a single thread can never deadlock.
"""
from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from edge_reft.chat import ChatTemplate, Prompter
from edge_reft.errors import ReftError
from edge_reft.patch import BaseModel, Patch
from edge_reft.positions import reusable_prefix
from edge_reft.reftfile import load_patch

from .edits import EMPTY, PatchSet
from .kvstates import SavedStates
from .sampling import Sampler, SamplingParams
from .textstream import TextStream

PatchLike = Patch | str | os.PathLike | PatchSet | None
CACHE_MODES = ("exact", "fast", "off")


@dataclass
class Completion:
    text: str
    tokens: list[int]
    prompt_tokens: list[int]
    finish_reason: str          # "stop" (end of turn or a stop string), "length" or "cancelled"
    prefill_s: float = 0.0
    decode_s: float = 0.0
    reused_tokens: int = 0      # prompt tokens served from the KV cache


class Generation:
    """Iterate for text pieces as they are generated; ``result`` once done."""

    def __init__(self, it: Iterator[str]):
        self._it = it
        self.result: Completion | None = None

    def __iter__(self) -> "Generation":
        return self

    def __next__(self) -> str:
        return next(self._it)

    def close(self) -> None:
        self._it.close()

    def __str__(self) -> str:
        """The whole reply (generating the rest first), so ``print(engine.generate(...))`` works."""
        return self.collect().text

    def collect(self) -> Completion:
        for _ in self:
            pass
        assert self.result is not None
        return self.result


class Reply:
    """One sequence's decoding: sampling, end of turn, stop strings, the finish reason.  The
    generate loop (``EngineBase._run``) and a backend's batched loop both step through it,
    so every row of a batch ends exactly as a single generation would."""

    def __init__(self, engine: "EngineBase", sampling: SamplingParams, stop: Sequence[str]):
        self.engine, self.sampler, self.text = engine, Sampler(sampling), TextStream(stop)
        self.tokens: list[int] = []
        self.finish, self.done = "length", False

    def step(self, logits: np.ndarray) -> tuple[int, str]:
        """Sample the next token from ``logits``: (the token, its text piece); ``done`` is then
        set if the reply ended (an end-of-generation token, which is not kept, or a stop string)."""
        tok = self.sampler(logits, self.tokens)
        if self.engine._is_eog(tok):
            self.finish, self.done = "stop", True
            return tok, ""
        self.tokens.append(tok)
        piece = self.text.feed(self.engine._piece(tok))
        if self.text.stopped:
            self.finish, self.done = "stop", True
        return tok, piece

    def completion(self, prompt: list[int], prefill_s: float, decode_s: float, reused: int) -> Completion:
        return Completion(self.text.text, self.tokens, prompt, self.finish, prefill_s, decode_s, reused)


# A reused prompt is never resumed with a single token: llama.cpp's CPU attention takes
# another kernel for a one-token batch (ggml_vec_dot instead of llamafile's sgemm, which
# needs n >= 2), whose rounding differs (max |logit difference| 0.39 measured on SmolLM2
# Q4_1); with two or more, reuse is bitwise what recomputing gives (x86-64, tested).
MIN_RECOMPUTED = 2


@dataclass
class _Cache:
    pset: PatchSet = EMPTY              # the patches the cached states were computed under
    tokens: list[int] = field(default_factory=list)
    n_prompt: int = 0


@dataclass
class Segment:
    """Consecutive tokens of one sequence in a batched forward pass."""
    seq: int
    tokens: Sequence[int]
    start: int                          # position of the first token
    n_prompt: int
    pset: PatchSet
    logits: bool                        # return the logits of the last token


class EngineBase:
    base: BaseModel
    n_ctx: int
    n_ubatch: int
    chat: ChatTemplate | None
    # Whether a generated token's KV, computed in a one-token decode step with its edit, is
    # bitwise what a batch recomputation gives.  The llama.cpp gate edits each row alike; an
    # in-graph edit (ONNX MatMul) takes another kernel for one row than for several.
    decode_rows_reusable = True
    n_seq = 1  # sequences the context holds (slots a batch decodes together)

    def __init__(self, state_cache_mb: float = 0.0) -> None:
        self._lock = threading.Lock()
        self._active: tuple[int, Generation] | None = None  # (thread, generation) holding the lock
        self._caches = [_Cache()]  # what each sequence's KV holds (one per slot)
        self._states: SavedStates[_Cache] = SavedStates(int(state_cache_mb * (1 << 20)))
        self._patch_cache: dict[tuple[str, int, int], Patch] = {}

    # ---- backend primitives ------------------------------------------------------------
    def _tokenize(self, text: str, add_special: bool) -> list[int]:
        raise NotImplementedError

    def _piece(self, token: int) -> bytes:
        raise NotImplementedError

    def _tokenize_text(self, text: str) -> list[int]:
        """``text`` as plain characters, special-token text in it not parsed (message content).
        Backends that can should override this; the default refuses text that would parse
        into a control token (one that renders as no text), so no content forges a turn."""
        toks = self._tokenize(text, False)
        if any(not self._piece(t) for t in toks):
            raise ReftError("message content holds the text of a control token (such as a chat turn "
                            "marker), which this backend cannot keep as plain text; remove it")
        return toks

    def _is_eog(self, token: int) -> bool:
        raise NotImplementedError

    def _forward(self, tokens: Sequence[int], start: int, n_prompt: int, pset: PatchSet,
                 all_logits: bool = False) -> np.ndarray:
        raise NotImplementedError

    def _keep(self, n: int, seq: int = 0) -> bool:
        raise NotImplementedError

    def _save_state(self, seq: int = 0) -> Any:
        """A sequence's KV cache content as an object with len() in bytes, or None (not supported)."""
        return None

    def _load_state(self, blob: Any, seq: int = 0) -> bool:
        """Replace a sequence's KV cache content with a saved one; False if that failed."""
        return False

    def _copy(self, src: int, dst: int, n: int) -> None:
        """Sequence ``dst`` becomes the first ``n`` positions of sequence ``src``."""
        raise NotImplementedError

    def _forward_batch(self, segments: Sequence[Segment]) -> list[np.ndarray | None]:
        """One forward pass over segments of different sequences (at most ``n_ubatch`` tokens
        in all), each with its own patches; the last logits of each segment that asks.  A
        backend of one sequence runs the one segment it can be given."""
        (s,) = segments
        logits = self._forward(s.tokens, s.start, s.n_prompt, s.pset)
        return [logits[-1] if s.logits else None]

    @property
    def _cache(self) -> _Cache:
        return self._caches[0]

    @_cache.setter
    def _cache(self, c: _Cache) -> None:
        self._caches[0] = c

    def close(self) -> None:
        pass

    def runtime_notes(self) -> str:
        """What the backend chose for this machine, in one line (``run -v``)."""
        return ""

    def __enter__(self) -> "EngineBase":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _exclusive(self, gen: "Generation | None" = None) -> Iterator[None]:
        """The engine's lock.  A generation this same thread left suspended while holding it
        is closed first: waiting for it would never end."""
        me, active = threading.get_ident(), self._active
        if active is not None and active[0] == me and active[1] is not gen:
            active[1].close()
        with self._lock:
            self._active = (me, gen) if gen is not None else None
            try:
                yield
            finally:
                self._active = None

    # ---- patches ---------------------------------------------------------------------
    def load_patch(self, path: str | os.PathLike[str]) -> Patch:
        """Load and validate a patch file (read once while unchanged).  Its fit to this model
        is checked where it binds to it: ``patch_set``, which ``generate`` calls."""
        st = os.stat(path)
        k = (os.path.abspath(path), st.st_mtime_ns, st.st_size)
        p = self._patch_cache.get(k)
        if p is None:
            p = load_patch(path)
            if len(self._patch_cache) > 256:
                self._patch_cache.clear()
            self._patch_cache[k] = p
        return p

    def patch_set(self, patch: PatchLike | Sequence[PatchLike], allow_mismatch: bool = False) -> PatchSet:
        """One patch, a path, or a list of them (applied in order), bound to this model: the
        one place a patch's base model and layers are checked against the model in hand."""
        if isinstance(patch, PatchSet):
            return patch
        items = [] if patch is None else list(patch) if isinstance(patch, (list, tuple)) else [patch]
        patches = [p if isinstance(p, Patch) else self.load_patch(p) for p in items]
        return PatchSet(patches, self.base, allow_mismatch) if patches else EMPTY

    # ---- prompts ---------------------------------------------------------------------
    def prompt_tokens(self, prompt: str | None = None, messages: Sequence[dict] | None = None,
                      raw: bool = False) -> list[int]:
        """Tokens of a prompt: through the chat template, or the text as is with ``raw``."""
        return self.prompter().prompt(prompt, messages, raw)

    def prompter(self) -> Prompter:
        """This model's Prompter (the same rendering and tokenization training uses)."""
        return Prompter(self.chat, self._tokenize, self._is_eog, self._tokenize_text)

    # ---- generation ------------------------------------------------------------------
    def generate(self, prompt: str | None = None, *, messages: Sequence[dict] | None = None,
                 patch: PatchLike | Sequence[PatchLike] = None, max_tokens: int = 128,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 stop: Sequence[str] = (), raw: bool = False, stream: bool = True,
                 cache: str = "exact", prompt_tokens: Sequence[int] | None = None,
                 **sampling: float) -> Generation | Completion:
        """Generate a reply; streams text pieces (``stream=True``) or returns a Completion.

        sampling: ``min_p``, ``repeat_penalty``, ``frequency_penalty``, ``presence_penalty``,
        ``penalty_last_n`` (runtime/sampling.py; the defaults change nothing).

        cache: "exact" reuses the KV cache only where it is provably the same
        as recomputing (FORMAT.md, "Positions"); "fast" reuses any shared token prefix even
        if the patch's positions moved; "off" recomputes the whole prompt.
        """
        from .batching import make_request
        r = make_request(self, prompt, messages=messages, patch=patch, max_tokens=max_tokens,
                         temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop, raw=raw,
                         cache=cache, prompt_tokens=prompt_tokens, **sampling)
        gen = Generation(iter(()))
        gen._it = self._run(gen, r.tokens, r.pset, r.sampling, r.max_tokens, r.stop, r.cache)
        return gen if stream else gen.collect()

    def _run(self, gen: Generation, toks: list[int], pset: PatchSet, sampling: SamplingParams,
             max_tokens: int, stop: Sequence[str], cache: str) -> Iterator[str]:
        with self._exclusive(gen):
            t0 = time.perf_counter()
            n_prompt = len(toks)
            reused = self._prefix_to_keep(toks, pset, cache)
            self._cache = _Cache()  # until the prompt is in, the KV cache matches nothing
            logits = self._forward(toks[reused:], reused, n_prompt, pset)
            self._cache = _Cache(pset, list(toks), n_prompt)
            t1 = time.perf_counter()
            reply = Reply(self, sampling, stop)
            try:
                for i in range(max_tokens):
                    tok, piece = reply.step(logits[-1])
                    if piece:
                        yield piece
                    if reply.done:
                        break
                    if i + 1 < max_tokens:
                        logits = self._forward([tok], n_prompt + i, n_prompt, pset)
                        self._cache.tokens.append(tok)
                tail = reply.text.close()
                if tail:
                    yield tail
            except GeneratorExit:
                reply.finish = "cancelled"
                raise
            finally:
                gen.result = reply.completion(toks, t1 - t0, time.perf_counter() - t1, reused)

    def generate_many(self, requests: Sequence[dict[str, Any]]) -> list[Completion]:
        """Several generations decoded together, each with its own patches: every dict holds
        ``generate``'s keywords (``prompt`` or ``messages``, ``patch``, ``max_tokens``,
        sampling, ``stop``, ``cache``); the Completions come back in order.  An engine opened
        with ``slots=S`` decodes up to S of them in each forward pass (runtime/batching.py);
        with one slot they run one after another."""
        from .batching import generate_many
        return generate_many(self, requests)

    def holds_state(self, key: str) -> bool:
        """Whether this engine holds KV state computed under the PatchSet ``key`` ("" for
        none), live or saved (for schedulers that send a request where its state is)."""
        return any(c.tokens and c.pset.key == key for c in self._caches) or key in self._states

    def _prefix_to_keep(self, toks: list[int], pset: PatchSet, cache: str, seq: int = 0) -> int:
        """Positions of sequence ``seq``'s KV cache the new prompt may keep; cuts it there.
        Under other patches than the cache's, first saves the cache and restores the state
        last computed under the new patches, if that shares more (see kvstates)."""
        c = self._caches[seq]
        n = _shared(c, toks, pset, cache)
        if cache != "off" and self._states.limit and c.pset.key != pset.key:
            saved = self._states.take(pset.key)
            if c.tokens:
                blob = self._save_state(seq)
                if blob is not None:
                    self._states.put(c.pset.key, c, blob)
            if saved is not None:
                m = _shared(saved[0], toks, pset, cache)
                if m <= n:
                    self._states.put(pset.key, *saved)
                elif self._load_state(saved[1], seq):
                    self._caches[seq], n = saved[0], m
                else:
                    n = 0
        n = self._reusable(n, toks, self._caches[seq], cache)
        if not self._keep(n, seq):
            n = 0
            self._keep(0, seq)
        return n

    def _reusable(self, n: int, toks: list[int], c: _Cache, cache: str) -> int:
        """``n`` shared positions of cache ``c``, less those that must be recomputed anyway."""
        n = max(0, min(n, len(toks) - MIN_RECOMPUTED))
        if cache == "exact" and not self.decode_rows_reusable and c.pset.edits_generated:
            n = min(n, c.n_prompt)  # rows edited one token at a time: recompute them
        return n

    def logits(self, tokens: Sequence[int], patch: PatchLike | Sequence[PatchLike] = None,
               n_prompt: int | None = None, last_only: bool = False) -> np.ndarray:
        """Logits at every position of ``tokens`` (n, vocab), or only the last (1, vocab); the
        first ``n_prompt`` tokens are the prompt (default: all).  For scoring and tests."""
        pset = self.patch_set(patch)
        with self._exclusive():
            self._cache = _Cache()
            self._keep(0)
            return self._forward(list(tokens), 0, len(tokens) if n_prompt is None else n_prompt,
                                 pset, all_logits=not last_only)


def _shared(c: _Cache, toks: list[int], pset: PatchSet, cache: str) -> int:
    """Leading positions of cache ``c`` a prompt under ``pset`` may keep.  Under the same
    patches: up to the first position whose token or edits differ (``fast``: whose token
    differs).  Under other patches: only positions before anything either set edits, which
    hold exactly what no patch computes."""
    if cache == "off" or not c.tokens:
        return 0
    same = c.pset.key == pset.key
    if same and cache == "fast":
        return reusable_prefix(c.tokens, np.zeros(len(c.tokens), np.uint64), toks,
                               np.zeros(len(toks), np.uint64))
    return reusable_prefix(c.tokens, c.pset.signature(c.n_prompt, len(c.tokens)),
                           toks, pset.signature(len(toks), len(toks)), same_edits=same)
