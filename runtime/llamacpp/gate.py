"""The eval callback that applies a patch inside llama.cpp: the native gate and its fallback.

llama.cpp names the residual stream after block L ``l_out-L``.  Before each
``llama_decode`` (one ubatch: the engine never submits more than ``n_ubatch``
tokens, so the columns of ``l_out-L`` are exactly the tokens it sent) a hook
learns which layers have rows to edit (``plan_jobs``); in the callback's ask
phase it asks for those tensors only, and in the data phase it reads the rows
with ``ggml_backend_tensor_get``, applies the reference edit and writes them
back with ``ggml_backend_tensor_set`` (CPU and GPU buffers alike).

``NativeHook`` runs the callback in C (runtime/gate.c, built with the package
and loaded with ctypes); ``EvalHook`` is the same in Python, for installs
without a C compiler.  The gate reads tensors by name only (``l_out-L``), so it
does not depend on a backend's naming of other tensors (``inp_pos`` etc.).
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from edge_reft.errors import BackendError, ReftError

from ..edits import CompiledIntervention, apply_rows
from . import native as N

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
        self._expect = (0, 0)
        self.edited = 0  # l_out tensors edited (for the one-edit-per-job check)
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
        self.edited += 1

    def prepare(self, jobs: list[Job]) -> None:
        self.asked = {j.name: j for j in jobs}
        self._expect = (self.edited, len(jobs))

    def finish(self, check: bool = True) -> None:
        self.asked = {}
        err, self.error = self.error, None
        if err is not None:
            raise BackendError(f"the patch could not be applied inside llama.cpp: {err}") from err
        if check:
            _check_count(self.edited, *self._expect)

    def close(self) -> None:
        pass


class NativeHook:
    """The eval callback in C (runtime/gate.c): Python only describes each ubatch's jobs."""

    def __init__(self, lib: object, n_embd: int):
        self.gate = Gate(lib, n_embd)
        self.callback, self.callback_data = self.gate.callback, self.gate.state
        self._expect = (0, 0)

    def prepare(self, jobs: list[Job]) -> None:
        self._expect = (self.gate.edited(), len(jobs))
        if not jobs:
            return
        arr = (GateJob * len(jobs))()
        keep: list[object] = [arr]
        for dst, job in zip(arr, jobs):
            edits = (GateEdit * len(job.edits))()
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

    def finish(self, check: bool = True) -> None:
        self.gate.set_jobs(None)
        err = self.gate.take_error()
        if err is not None:
            raise BackendError(f"the patch could not be applied inside llama.cpp: {err}")
        if check:
            _check_count(self.gate.edited(), *self._expect)

    def close(self) -> None:
        self.gate.free()


def _check_count(edited: int, before: int, jobs: int) -> None:
    """Each job's tensor must have been edited exactly once in the decode: llama.cpp split
    the batch into several ubatches (or named the layer otherwise) if not."""
    if edited - before != jobs:
        raise BackendError(f"llama.cpp computed {edited - before} of this ubatch's {jobs} edited layers; "
                           "it did not run the batch as one ubatch in the order submitted, so the "
                           "patch was not applied as asked")


def make_hook(gate: str, n_embd: int) -> EvalHook | NativeHook:
    """gate: "native" (C; fails if not built), "python", or "auto" (native when built)."""
    if gate not in ("auto", "native", "python"):
        raise ReftError(f"gate: {gate!r}, expected 'auto', 'native' or 'python'")
    lib = load_gate() if gate != "python" else None
    if lib is None and gate == "native":
        raise BackendError("the native gate (edge_reft.runtime.llamacpp._gate) was not built with this install; "
                           "reinstall with a C compiler available, or use gate='python'")
    return NativeHook(lib, n_embd) if lib is not None else EvalHook(n_embd)


# ---- the native gate's ctypes face (runtime/gate.c) ------------------------------------------
class GateEdit(ctypes.Structure):
    _fields_ = [("rank", ctypes.c_int32), ("n_rows", ctypes.c_int32), ("rows", ctypes.POINTER(ctypes.c_int32)),
                ("rotate", ctypes.POINTER(ctypes.c_float)), ("delta", ctypes.POINTER(ctypes.c_float)),
                ("bias", ctypes.POINTER(ctypes.c_float))]


class GateJob(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char * 64), ("n_rows", ctypes.c_int64), ("lo", ctypes.c_int64),
                ("span", ctypes.c_int64), ("n_edits", ctypes.c_int32), ("edits", ctypes.POINTER(GateEdit))]


GATE_ABI = 1


def load_gate() -> ctypes.CDLL | None:
    """The compiled gate (built with the package), or None where no compiler was available."""
    try:
        from . import _gate
    except ImportError:
        return None
    lib = ctypes.CDLL(_gate.__file__)
    lib.edge_gate_abi.restype = ctypes.c_int32
    if lib.edge_gate_abi() != GATE_ABI:
        return None
    lib.edge_gate_new.argtypes = [ctypes.c_int32] + [ctypes.c_void_p] * 5
    lib.edge_gate_new.restype = ctypes.c_void_p
    lib.edge_gate_set_jobs.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.POINTER(GateJob)]
    lib.edge_gate_set_jobs.restype = None
    lib.edge_gate_take_error.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32]
    lib.edge_gate_take_error.restype = ctypes.c_int32
    lib.edge_gate_edited.argtypes = [ctypes.c_void_p]
    lib.edge_gate_edited.restype = ctypes.c_int64
    lib.edge_gate_free.argtypes = [ctypes.c_void_p]
    lib.edge_gate_free.restype = None
    return lib


def _addr(fn: object) -> int:
    return ctypes.cast(fn, ctypes.c_void_p).value


class Gate:
    """One native gate state (per context): its callback pointer and user data."""

    def __init__(self, lib: ctypes.CDLL, n_embd: int):
        self.lib = lib
        self.state = lib.edge_gate_new(n_embd, _addr(N.ggml_get_name), _addr(N.ggml_nelements),
                                       _addr(N.ggml_is_contiguous), _addr(N.ggml_backend_tensor_get),
                                       _addr(N.ggml_backend_tensor_set))
        if not self.state:
            raise BackendError("the native gate could not allocate its state")
        self.callback = N.EvalCallback(_addr(lib.edge_gate_eval))
        self._jobs: object = None  # the ctypes arrays of the ubatch in flight

    def set_jobs(self, jobs: ctypes.Array | None, keepalive: object = None) -> None:
        self._jobs = (jobs, keepalive)
        self.lib.edge_gate_set_jobs(self.state, len(jobs) if jobs is not None else 0, jobs)

    def take_error(self) -> str | None:
        buf = ctypes.create_string_buffer(256)
        code = self.lib.edge_gate_take_error(self.state, buf, 256)
        return f"{buf.value.decode(errors='replace')} (code {code})" if code else None

    def edited(self) -> int:
        return self.lib.edge_gate_edited(self.state)

    def free(self) -> None:
        if self.state:
            self.lib.edge_gate_free(self.state)
            self.state = None
