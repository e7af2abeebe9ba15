"""The llama.cpp backend: LoReFT applied inside llama.cpp's eval callback.

llama.cpp names the residual stream after block L ``l_out-L``.  Before each
``llama_decode`` (one ubatch: we never submit more than ``n_ubatch``
tokens, so the columns of ``l_out-L`` are exactly the tokens we sent) the
hook learns which layers have rows to edit; in the callback's ask phase it
asks for those tensors only, and in the data phase it reads the rows with
``ggml_backend_tensor_get``, applies the reference edit and writes them back
with ``ggml_backend_tensor_set`` (works for CPU and GPU buffers alike).

The last block's ``l_out`` is pruned by llama.cpp to the rows that produce
logits, so there the columns are the output rows, in batch order.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from edge_reft.chat import ChatTemplate
from edge_reft.errors import BackendError, ReftError
from edge_reft.fingerprint import from_gguf
from edge_reft.models import default_model

from . import llama_native as N
from .edits import CompiledIntervention, PatchSet, apply_rows
from .engine import EngineBase


@dataclass(frozen=True)
class _Job:
    layer: int
    n_rows: int      # rows l_out-L must have in this ubatch
    lo: int          # first row touched
    span: int        # rows lo .. lo+span-1 are read and written back
    edits: tuple[tuple[CompiledIntervention, np.ndarray], ...]  # rows relative to lo


class EvalHook:
    """The Python eval callback: asks for the layers to edit, edits their rows."""

    def __init__(self, n_embd: int, n_layer: int):
        self.n_embd, self.last = n_embd, n_layer - 1
        self.names = [f"l_out-{L}".encode() for L in range(n_layer)]
        self.asked: dict[bytes, _Job] = {}
        self.error: BaseException | None = None
        self.thunk = N.EvalCallback(self._callback)  # owned here, for the context's lifetime

    def _callback(self, t: int, ask: bool, _user: int) -> bool:
        try:
            if ask:
                return bool(self.asked) and N.ggml_get_name(t) in self.asked
            job = self.asked.get(N.ggml_get_name(t))
            if job is not None:
                self._edit(t, job)
        except BaseException as e:  # returning False would silently skip the graph's rest
            if self.error is None:
                self.error = e
        return True

    def _edit(self, t: int, job: _Job) -> None:
        d = self.n_embd
        if N.tensor_type(t) != N.GGML_TYPE_F32 or not N.ggml_is_contiguous(t):
            raise BackendError(f"l_out-{job.layer}: expected a contiguous F32 tensor "
                               f"(ggml type {N.tensor_type(t)}); refusing to write")
        n = N.ggml_nelements(t)
        if n != job.n_rows * d:
            raise BackendError(f"l_out-{job.layer}: {n} elements, expected {job.n_rows} rows of {d}; "
                               "the ubatch is not what was submitted, refusing to write")
        buf = np.empty((job.span, d), dtype=np.float32)
        off, size = job.lo * d * 4, buf.nbytes
        N.ggml_backend_tensor_get(t, buf.ctypes.data, off, size)
        apply_rows(buf, job.edits)
        N.ggml_backend_tensor_set(t, buf.ctypes.data, off, size)

    def prepare(self, edits: dict[int, list[tuple[CompiledIntervention, np.ndarray]]], n_rows: int,
                out_rows: np.ndarray) -> None:
        """Set up the jobs of the next ubatch (``n_rows`` tokens, outputs at ``out_rows``)."""
        asked = {}
        for layer, items in edits.items():
            rows_in_tensor = n_rows
            if layer == self.last:  # pruned to the output rows: map token rows to tensor rows
                items = [(c, np.searchsorted(out_rows, r[np.isin(r, out_rows)])) for c, r in items]
                items = [(c, r) for c, r in items if r.size]
                rows_in_tensor = len(out_rows)
            if not items:
                continue
            lo = min(int(r.min()) for _, r in items)
            hi = max(int(r.max()) for _, r in items) + 1
            asked[self.names[layer]] = _Job(layer, rows_in_tensor, lo, hi - lo,
                                            tuple((c, r - lo) for c, r in items))
        self.asked = asked

    def finish(self) -> None:
        self.asked = {}
        err, self.error = self.error, None
        if err is not None:
            raise BackendError(f"the patch could not be applied inside llama.cpp: {err}") from err


class LlamaCppEngine(EngineBase):
    """Generate with a GGUF model through llama.cpp, applying patches per call."""

    def __init__(self, model: str | os.PathLike[str] | None = None, *, n_ctx: int = 2048,
                 n_ubatch: int = 512, n_threads: int | None = None, n_gpu_layers: int = 0,
                 flash_attn: bool = False, kv_f32: bool = False, patches: bool = True,
                 verbose: bool = False):
        super().__init__()
        path = os.fspath(model) if model is not None else str(default_model())
        if not os.path.isfile(path):
            raise ReftError(f"{path}: no such model file (expected a .gguf)")
        self.path = path
        self.base = from_gguf(path)
        try:
            self.chat = ChatTemplate.from_gguf(path)
        except ReftError:
            self.chat = None
        self.hook = EvalHook(self.base.n_embd, self.base.n_layer) if patches else None
        self.native = N.Native(path, n_ctx=n_ctx, n_ubatch=n_ubatch, n_threads=n_threads or os.cpu_count() or 1,
                               n_gpu_layers=n_gpu_layers, flash_attn=flash_attn,
                               callback=self.hook.thunk if self.hook else None, kv_f32=kv_f32,
                               verbose=verbose)
        if (self.native.n_embd, self.native.n_layer) != (self.base.n_embd, self.base.n_layer):
            raise BackendError(f"{path}: llama.cpp reports n_embd={self.native.n_embd}, "
                               f"n_layer={self.native.n_layer}; the GGUF metadata says "
                               f"{self.base.n_embd}, {self.base.n_layer}")
        self.n_ctx, self.n_ubatch = self.native.n_ctx, self.native.n_ubatch

    def close(self) -> None:
        self.native.close()

    def _tokenize(self, text: str, add_special: bool) -> list[int]:
        return self.native.tokenize(text, add_special=add_special, parse_special=True)

    def _piece(self, token: int) -> bytes:
        return self.native.piece(token)

    def _is_eog(self, token: int) -> bool:
        return self.native.is_eog(token)

    def _keep(self, n: int) -> bool:
        return self.native.keep(n)

    def _forward(self, tokens: Sequence[int], start: int, n_prompt: int, pset: PatchSet,
                 all_logits: bool = False) -> np.ndarray:
        if pset and self.hook is None:
            raise ReftError("this engine was created with patches=False; it cannot apply a patch")
        toks = np.asarray(tokens, dtype=np.int32)
        n, step, rows = len(toks), self.n_ubatch, []
        for a in range(0, n, step):
            chunk = toks[a:a + step]
            m = len(chunk)
            outputs = np.zeros(m, dtype=np.int8)
            if all_logits:
                outputs[:] = 1
            elif a + m == n:
                outputs[-1] = 1
            if pset:
                self.hook.prepare(pset.chunk_edits(start + a, m, n_prompt), m, np.flatnonzero(outputs))
            try:
                self.native.decode(chunk, start + a, outputs)
            finally:
                if self.hook is not None:
                    self.hook.finish()
            if all_logits:
                rows.extend(self.native.logits(i) for i in range(m))
        return np.stack(rows) if all_logits else self.native.logits(-1)[None]
