"""The llama.cpp engine: patches applied inside llama.cpp's eval callback (gate.py).

One model, one sequence.  A ubatch that edits something runs in the context
that has the callback; with ``split_decode`` (the default when layers are on a
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
from ..engine import EngineBase
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
    contexts copies one block per layer instead of one row per channel.
    """

    def __init__(self, model: str | os.PathLike[str], *, n_ctx: int = 2048,
                 n_ubatch: int = 512, n_threads: int | None = None, n_gpu_layers: int = 0,
                 flash_attn: bool | None = None, kv_f32: bool = False, op_offload: bool = True,
                 patches: bool = True, gate: str = "auto", state_cache_mb: float = 64.0,
                 split_decode: bool | None = None, repack: str | None = None, verbose: bool = False):
        super().__init__(state_cache_mb)
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
        self.native = N.Native(path, n_ctx=n_ctx, n_ubatch=n_ubatch, n_threads=n_threads or os.cpu_count() or 1,
                               n_gpu_layers=n_gpu_layers,
                               flash_attn=(None if n_gpu_layers > 0 else False) if flash_attn is None else flash_attn,
                               callback=self.hook.callback if self.hook else None,
                               callback_data=self.hook.callback_data if self.hook else None,
                               kv_f32=kv_f32, op_offload=op_offload, use_extra_bufts=use_extra_bufts,
                               verbose=verbose,
                               split=n_gpu_layers > 0 if split_decode is None else split_decode)
        if (self.native.n_embd, self.native.n_layer) != (self.base.n_embd, self.base.n_layer):
            raise BackendError(f"{path}: llama.cpp reports n_embd={self.native.n_embd}, "
                               f"n_layer={self.native.n_layer}; the GGUF metadata says "
                               f"{self.base.n_embd}, {self.base.n_layer}")
        self.n_ctx, self.n_ubatch = self.native.n_ctx, self.native.n_ubatch

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

    def _keep(self, n: int) -> bool:
        return self.native.keep(n)

    def _save_state(self) -> ctypes.Array:
        return self.native.save_state()

    def _load_state(self, blob: ctypes.Array) -> bool:
        return self.native.load_state(blob)

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
            if edit:
                self.hook.prepare(plan_jobs(plan, m, np.flatnonzero(outputs), self.base.n_layer - 1))
            try:
                self.native.decode(chunk, start + a, outputs, edit=edit)
            finally:
                if self.hook is not None:
                    self.hook.finish()
            if all_logits:
                rows.extend(self.native.logits(i) for i in range(m))
        return np.stack(rows) if all_logits else self.native.logits(-1)[None]
