"""The llama.cpp engine: patches applied inside llama.cpp's eval callback (gate.py).

One model; one sequence, or ``slots`` sequences decoded together in one batch
(runtime/batching.py), each row edited by its own sequence's patches.  A ubatch
that edits something runs in the context that has the callback; with ``split_decode`` (the default when layers are on a
GPU) a ubatch that edits nothing runs in a second context without one, so
decode after a prompt-scoped patch costs what plain llama.cpp costs
(native.Native moves the KV cache between the two, bit for bit).

The last block's ``l_out`` is pruned by llama.cpp to the rows that produce
logits, so there the columns are the output rows, in batch order.
"""
from __future__ import annotations

import ctypes
import os
from typing import Callable, Sequence

import numpy as np

from edge_reft.chat import ChatTemplate, Prompter
from edge_reft.errors import BackendError, ReftError
from edge_reft.fingerprint import from_gguf

from ..edits import PatchSet
from ..engine import EngineBase, Segment
from . import native as N
from .gate import EvalHook, NativeHook, make_hook, plan_jobs
from .repack import choose_repack


def ubatches(n: int, size: int) -> list[tuple[int, int]]:
    """Split n tokens into ubatches of at most ``size``, none of one token when n > 1 (a
    one-token batch takes other attention kernels: see engine.MIN_RECOMPUTED)."""
    bounds = list(range(0, n, size)) + [n]
    if size > 2 and len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        bounds[-2] -= 1
    return list(zip(bounds, bounds[1:]))


class LlamaCppEngine(EngineBase):
    """Generate with a GGUF model through llama.cpp, applying patches per call.

    ``state_cache_mb`` bounds the KV states kept for patches other than the current one
    (runtime/kvstates.py; 0 turns it off): a context serving many users resumes each one.
    ``split_decode``: decode unedited tokens in a second context without the eval callback
    (None: when layers are on a GPU, where the callback alone costs ~6 %; it costs a second
    KV cache and compute buffer).  ``repack``: llama.cpp's CPU weight repacking, "auto"
    (off where the pinned build's AMX path would crash), "on" or "off"; default from
    $EDGE_REFT_REPACK, else "auto".  ``flash_attn`` None: llama.cpp's own choice (auto) with
    layers on a GPU, off on the CPU (its kernels there round differently from the reference).
    With it, the KV cache's V is not stored transposed, so moving a sequence between the two
    contexts copies one block per layer instead of one row per channel.  ``slots``: sequences
    decoded together (``generate_many``, the server; runtime/batching.py); ``n_ctx`` is then
    each one's context.  ``kv_unified``: one KV stream for all slots (every step one ubatch),
    else one per slot (the default), which keeps each answer on a CPU bit for bit what it is
    alone.
    """

    def __init__(self, model: str | os.PathLike[str], *, n_ctx: int = 2048,
                 n_ubatch: int = 512, n_threads: int | None = None, n_gpu_layers: int = 0,
                 flash_attn: bool | None = None, kv_f32: bool = False, op_offload: bool = True,
                 patches: bool = True, gate: str = "auto", state_cache_mb: float = 64.0,
                 split_decode: bool | None = None, repack: str | None = None, slots: int = 1,
                 kv_unified: bool = False, verbose: bool = False):
        super().__init__(state_cache_mb)
        if not isinstance(slots, int) or not 1 <= slots <= min(256, n_ubatch):
            raise ReftError(f"slots: {slots!r}, expected an integer in 1..{min(256, n_ubatch)} (sequences "
                            f"decoded together; at most n_ubatch, and llama.cpp's 256)")
        if slots > 1 and split_decode:
            raise ReftError("split_decode keeps one sequence in two contexts; it cannot be used with slots > 1")
        path = os.fspath(model)
        if not os.path.isfile(path):
            raise ReftError(f"{path}: no such model file (expected a .gguf)")
        self.path = path
        self.base = from_gguf(path)
        try:
            self.chat = ChatTemplate.from_gguf(path)
        except ReftError:
            self.chat = None
        self.hook = make_hook(gate, self.base.n_embd) if patches else None
        use_extra_bufts, self.repack_note = choose_repack(repack)
        # one KV stream per slot unless asked: answers bit-exact whatever the batch on a CPU, and
        # faster on a GPU too (H200: 2.8x one slot with a patch per request, unified 1.7x;
        # benchmarks/results/batch_decode_h200.txt), where the gate then moves small row spans
        self.kv_unified = bool(kv_unified)
        self.native = N.Native(path, n_ctx=n_ctx * slots, n_ubatch=n_ubatch, n_seq=slots,
                               kv_unified=self.kv_unified, n_threads=n_threads or os.cpu_count() or 1,
                               n_gpu_layers=n_gpu_layers,
                               flash_attn=(None if n_gpu_layers > 0 else False) if flash_attn is None else flash_attn,
                               callback=self.hook.callback if self.hook else None,
                               callback_data=self.hook.callback_data if self.hook else None,
                               kv_f32=kv_f32, op_offload=op_offload, use_extra_bufts=use_extra_bufts,
                               verbose=verbose,
                               split=(n_gpu_layers > 0 and slots == 1) if split_decode is None else split_decode)
        if (self.native.n_embd, self.native.n_layer) != (self.base.n_embd, self.base.n_layer):
            raise BackendError(f"{path}: llama.cpp reports n_embd={self.native.n_embd}, "
                               f"n_layer={self.native.n_layer}; the GGUF metadata says "
                               f"{self.base.n_embd}, {self.base.n_layer}")
        self.n_ubatch, self.n_seq = self.native.n_ubatch, slots
        self.n_ctx = n_ctx if slots > 1 else self.native.n_ctx  # per sequence
        self._caches = [self._caches[0]] + [type(self._caches[0])() for _ in range(slots - 1)]

    @staticmethod
    def vocab_prompter(path: str | os.PathLike[str]) -> tuple[Prompter, Callable[[], None]]:
        """The Prompter of a GGUF from its vocabulary alone (no weights loaded), for training
        data, and its closer: the same tokens and template this engine serves with."""
        vocab = N.Vocab.load(path)
        try:
            template = ChatTemplate.from_gguf(path)
        except ReftError:
            template = None
        return Prompter(template, vocab.tokenize, vocab.is_eog,
                        lambda text: vocab.tokenize(text, False, parse_special=False)), vocab.close

    def runtime_notes(self) -> str:
        """What the runtime chose, for ``run -v``: repacking, contexts, gate."""
        gate = ("native (C)" if isinstance(self.hook, NativeHook) else
                "Python" if isinstance(self.hook, EvalHook) else "none")
        ctxs = "two contexts (edits / plain decode)" if self.native.split else "one context"
        return f"{self.repack_note}; {ctxs}; gate: {gate}"

    def close(self) -> None:
        self._states.clear()
        self.native.close()
        if self.hook is not None:
            self.hook.close()

    def _tokenize(self, text: str, add_special: bool) -> list[int]:
        return self.native.vocab.tokenize(text, add_special)

    def _tokenize_text(self, text: str) -> list[int]:
        return self.native.vocab.tokenize(text, False, parse_special=False)

    def _piece(self, token: int) -> bytes:
        return self.native.vocab.piece(token)

    def _is_eog(self, token: int) -> bool:
        return self.native.vocab.is_eog(token)

    def _keep(self, n: int, seq: int = 0) -> bool:
        return self.native.keep(n, seq)

    def _save_state(self, seq: int = 0) -> ctypes.Array:
        return self.native.save_state(seq)

    def _load_state(self, blob: ctypes.Array, seq: int = 0) -> bool:
        return self.native.load_state(blob, seq)

    def _copy(self, src: int, dst: int, n: int) -> None:
        self.native.copy(src, dst, n)

    def _forward(self, tokens: Sequence[int], start: int, n_prompt: int, pset: PatchSet,
                 all_logits: bool = False) -> np.ndarray:
        if pset and self.hook is None:
            raise ReftError("this engine was created with patches=False; it cannot apply a patch")
        toks = np.asarray(tokens, dtype=np.int32)
        n, rows = len(toks), []
        bounds = ubatches(n, self.n_ubatch)
        plans = [pset.chunk_edits(start + a, b - a, n_prompt) if pset else {} for a, b in bounds]
        # every ubatch of one call runs in one context: moving mid-prompt would only add copies
        edit = any(plans)
        for (a, b), plan in zip(bounds, plans):
            chunk = toks[a:b]
            m = len(chunk)
            outputs = np.zeros(m, dtype=np.int8)
            if all_logits:
                outputs[:] = 1
            elif a + m == n:
                outputs[-1] = 1
            self._decode(chunk, start + a, outputs, 0, plan if edit else None)
            if all_logits:
                rows.extend(self.native.logits(i) for i in range(m))
        return np.stack(rows) if all_logits else self.native.logits(-1)[None]

    def _forward_batch(self, segments: Sequence[Segment]) -> list[np.ndarray | None]:
        """Segments of several sequences (one each), each edited by its own patches: one
        ubatch with a unified KV cache, else as few as llama.cpp's equal split allows (a run
        of consecutive sequences with as many tokens each is one)."""
        if any(s.pset for s in segments) and self.hook is None:
            raise ReftError("this engine was created with patches=False; it cannot apply a patch")
        order = sorted(range(len(segments)), key=lambda i: segments[i].seq)
        if self.kv_unified:  # llama.cpp keeps the order of one stream's batch: one ubatch
            rows = self._ubatch([segments[i] for i in order])
            return [rows[order.index(i)] for i in range(len(segments))]
        out: list[np.ndarray | None] = [None] * len(segments)
        group: list[int] = []
        for i in order + [-1]:
            s = segments[i] if i >= 0 else None
            if group and (s is None or s.seq != segments[group[-1]].seq + 1
                          or len(s.tokens) != len(segments[group[0]].tokens)
                          or len(s.tokens) * (len(group) + 1) > self.n_ubatch):
                for j, row in zip(group, self._ubatch([segments[j] for j in group])):
                    out[j] = row
                group = []
            if s is not None:
                group.append(i)
        return out

    def _ubatch(self, segments: Sequence[Segment]) -> list[np.ndarray | None]:
        """One ubatch: the segments' tokens in order (so row i of ``l_out`` is the i-th token
        submitted), each segment's rows edited by its own patches."""
        n = sum(len(s.tokens) for s in segments)
        if n > self.n_ubatch:
            raise ReftError(f"a batch of {n} tokens exceeds n_ubatch ({self.n_ubatch})")
        toks, pos, seq = np.empty(n, np.int32), np.empty(n, np.int32), np.empty(n, np.int32)
        outputs, ends = np.zeros(n, np.int8), []
        plan: dict[int, list] = {}
        a = 0
        for s in segments:
            m = len(s.tokens)
            toks[a:a + m], pos[a:a + m], seq[a:a + m] = s.tokens, np.arange(s.start, s.start + m), s.seq
            if s.logits:
                outputs[a + m - 1] = 1
            ends.append(a + m - 1)
            if s.pset:
                for layer, items in s.pset.chunk_edits(s.start, m, s.n_prompt).items():
                    plan.setdefault(layer, []).extend((c, rows + a) for c, rows in items)
            a += m
        self._decode(toks, pos, outputs, seq, plan or None)
        return [self.native.logits(e) if s.logits else None for s, e in zip(segments, ends)]

    def _decode(self, toks: np.ndarray, pos: int | np.ndarray, outputs: np.ndarray, seq: int | np.ndarray,
                plan: dict | None) -> None:
        """One llama_decode, with the gate told this ubatch's edits (``plan``: None, none)."""
        if plan is not None:
            self.hook.prepare(plan_jobs(plan, len(toks), np.flatnonzero(outputs), self.base.n_layer - 1))
        try:
            self.native.decode(toks, pos, outputs, edit=plan is not None, seq=seq)
        except BaseException:
            if self.hook is not None:
                self.hook.finish(check=False)
            raise
        if self.hook is not None:
            self.hook.finish()
