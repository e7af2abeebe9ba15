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

import ctypes
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
class Job:
    """What to do to one ``l_out-L`` tensor in one ubatch."""
    layer: int
    name: bytes
    n_rows: int      # rows l_out-L must have in this ubatch
    lo: int          # first row touched
    span: int        # rows lo .. lo+span-1 are read and written back
    edits: tuple[tuple[CompiledIntervention, np.ndarray], ...]  # rows relative to lo


def plan_jobs(edits: dict[int, list[tuple[CompiledIntervention, np.ndarray]]], n_rows: int,
              out_rows: np.ndarray, last_layer: int) -> list[Job]:
    """The jobs of one ubatch of ``n_rows`` tokens with outputs at ``out_rows``.

    Blocks below the last keep every row; the last block's ``l_out`` holds only
    the output rows (in batch order), so token rows are mapped to those.
    """
    jobs = []
    for layer, items in edits.items():
        rows_in_tensor = n_rows
        if layer == last_layer:
            items = [(c, np.searchsorted(out_rows, r[np.isin(r, out_rows)])) for c, r in items]
            items = [(c, r) for c, r in items if r.size]
            rows_in_tensor = len(out_rows)
        if not items:
            continue
        lo = min(int(r.min()) for _, r in items)
        hi = max(int(r.max()) for _, r in items) + 1
        jobs.append(Job(layer, f"l_out-{layer}".encode(), rows_in_tensor, lo, hi - lo,
                        tuple((c, r - lo) for c, r in items)))
    return jobs


class EvalHook:
    """The eval callback in Python (the fallback where the native gate was not built)."""

    def __init__(self, n_embd: int):
        self.n_embd = n_embd
        self.asked: dict[bytes, Job] = {}
        self.error: BaseException | None = None
        self.callback = N.EvalCallback(self._callback)  # owned here, for the context's lifetime
        self.callback_data = None

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

    def _edit(self, t: int, job: Job) -> None:
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

    def prepare(self, jobs: list[Job]) -> None:
        self.asked = {j.name: j for j in jobs}

    def finish(self) -> None:
        self.asked = {}
        err, self.error = self.error, None
        if err is not None:
            raise BackendError(f"the patch could not be applied inside llama.cpp: {err}") from err

    def close(self) -> None:
        pass


class NativeHook:
    """The eval callback in C (runtime/gate.c): Python only describes each ubatch's jobs."""

    def __init__(self, lib: object, n_embd: int):
        self.gate = N.Gate(lib, n_embd)
        self.callback, self.callback_data = self.gate.callback, self.gate.state

    def prepare(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        arr = (N.GateJob * len(jobs))()
        keep: list[object] = [arr]
        for dst, job in zip(arr, jobs):
            edits = (N.GateEdit * len(job.edits))()
            keep.append(edits)
            for e, (c, rows) in zip(edits, job.edits):
                rows32 = np.ascontiguousarray(rows, dtype=np.int32)
                keep.append(rows32)
                e.rank, e.n_rows = c.rotate.shape[0], rows32.size
                e.rows = rows32.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
                e.rotate, e.delta, e.bias = (a.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
                                             for a in (c.rotate, c.delta, c.bias))
            dst.name, dst.n_rows, dst.lo, dst.span = job.name, job.n_rows, job.lo, job.span
            dst.n_edits, dst.edits = len(job.edits), edits
        self.gate.set_jobs(arr, keep)

    def finish(self) -> None:
        self.gate.set_jobs(None)
        err = self.gate.take_error()
        if err is not None:
            raise BackendError(f"the patch could not be applied inside llama.cpp: {err}")

    def close(self) -> None:
        self.gate.free()


def make_hook(gate: str, n_embd: int) -> EvalHook | NativeHook:
    """gate: "native" (C; fails if not built), "python", or "auto" (native when built)."""
    if gate not in ("auto", "native", "python"):
        raise ReftError(f"gate: {gate!r}, expected 'auto', 'native' or 'python'")
    lib = N.load_gate() if gate != "python" else None
    if lib is None and gate == "native":
        raise BackendError("the native gate (edge_reft.runtime._gate) was not built with this install; "
                           "reinstall with a C compiler available, or use gate='python'")
    return NativeHook(lib, n_embd) if lib is not None else EvalHook(n_embd)


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
    """

    def __init__(self, model: str | os.PathLike[str] | None = None, *, n_ctx: int = 2048,
                 n_ubatch: int = 512, n_threads: int | None = None, n_gpu_layers: int = 0,
                 flash_attn: bool = False, kv_f32: bool = False, op_offload: bool = True,
                 patches: bool = True, gate: str = "auto", state_cache_mb: float = 64.0,
                 verbose: bool = False):
        super().__init__(state_cache_mb)
        path = os.fspath(model) if model is not None else str(default_model())
        if not os.path.isfile(path):
            raise ReftError(f"{path}: no such model file (expected a .gguf)")
        self.path = path
        self.base = from_gguf(path)
        try:
            self.chat = ChatTemplate.from_gguf(path)
        except ReftError:
            self.chat = None
        self.hook = make_hook(gate, self.base.n_embd) if patches else None
        self.native = N.Native(path, n_ctx=n_ctx, n_ubatch=n_ubatch, n_threads=n_threads or os.cpu_count() or 1,
                               n_gpu_layers=n_gpu_layers, flash_attn=flash_attn,
                               callback=self.hook.callback if self.hook else None,
                               callback_data=self.hook.callback_data if self.hook else None,
                               kv_f32=kv_f32, op_offload=op_offload, verbose=verbose)
        if (self.native.n_embd, self.native.n_layer) != (self.base.n_embd, self.base.n_layer):
            raise BackendError(f"{path}: llama.cpp reports n_embd={self.native.n_embd}, "
                               f"n_layer={self.native.n_layer}; the GGUF metadata says "
                               f"{self.base.n_embd}, {self.base.n_layer}")
        self.n_ctx, self.n_ubatch = self.native.n_ctx, self.native.n_ubatch

    def close(self) -> None:
        self._states.clear()
        self.native.close()
        if self.hook is not None:
            self.hook.close()

    def _tokenize(self, text: str, add_special: bool) -> list[int]:
        return self.native.vocab.tokenize(text, add_special)

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
        for a, b in ubatches(n, self.n_ubatch):
            chunk = toks[a:b]
            m = len(chunk)
            outputs = np.zeros(m, dtype=np.int8)
            if all_logits:
                outputs[:] = 1
            elif a + m == n:
                outputs[-1] = 1
            if pset:
                self.hook.prepare(plan_jobs(pset.chunk_edits(start + a, m, n_prompt), m,
                                            np.flatnonzero(outputs), self.base.n_layer - 1))
            try:
                self.native.decode(chunk, start + a, outputs)
            finally:
                if self.hook is not None:
                    self.hook.finish()
            if all_logits:
                rows.extend(self.native.logits(i) for i in range(m))
        return np.stack(rows) if all_logits else self.native.logits(-1)[None]
