"""The thin native layer: every ctypes call and pointer of the llama.cpp backend.

llama-cpp-python (pinned exactly: 0.3.36) mirrors llama.h one-to-one in
``llama_cpp.llama_cpp``; the few ggml functions the edit needs live in
libggml-base and are declared here.  Native resources are owned by small
classes released through an ``ExitStack``; everything above this module is
plain Python and numpy.
"""
from __future__ import annotations

import ctypes
import os
from contextlib import ExitStack
from pathlib import Path

import llama_cpp
import llama_cpp.llama_cpp as C
import numpy as np

from edge_reft.errors import BackendError

PINNED_VERSION = "0.3.36"
GGML_TYPE_F32 = 0
LIB_DIR = Path(llama_cpp.__file__).parent / "lib"

# ggml-base: tensor access that also works for GPU (CUDA/Metal/Vulkan) buffers
_ggml = ctypes.CDLL(str(LIB_DIR / "libggml-base.so"))
# const char * ggml_get_name(const struct ggml_tensor * tensor);
ggml_get_name = _ggml.ggml_get_name
ggml_get_name.argtypes, ggml_get_name.restype = [ctypes.c_void_p], ctypes.c_char_p
# int64_t ggml_nelements(const struct ggml_tensor * tensor);
ggml_nelements = _ggml.ggml_nelements
ggml_nelements.argtypes, ggml_nelements.restype = [ctypes.c_void_p], ctypes.c_int64
# size_t ggml_nbytes(const struct ggml_tensor * tensor);
ggml_nbytes = _ggml.ggml_nbytes
ggml_nbytes.argtypes, ggml_nbytes.restype = [ctypes.c_void_p], ctypes.c_size_t
# bool ggml_is_contiguous(const struct ggml_tensor * tensor);
ggml_is_contiguous = _ggml.ggml_is_contiguous
ggml_is_contiguous.argtypes, ggml_is_contiguous.restype = [ctypes.c_void_p], ctypes.c_bool
# void ggml_backend_tensor_get(const struct ggml_tensor * tensor, void * data, size_t offset, size_t size);
ggml_backend_tensor_get = _ggml.ggml_backend_tensor_get
ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
ggml_backend_tensor_get.restype = None
# void ggml_backend_tensor_set(struct ggml_tensor * tensor, const void * data, size_t offset, size_t size);
ggml_backend_tensor_set = _ggml.ggml_backend_tensor_set
ggml_backend_tensor_set.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
ggml_backend_tensor_set.restype = None


def tensor_type(t: int) -> int:
    """``t->type``: the first member of struct ggml_tensor (an enum, so a C int)."""
    return ctypes.c_int.from_address(t).value


def check_version() -> None:
    if llama_cpp.__version__ != PINNED_VERSION:
        raise BackendError(f"llama-cpp-python {llama_cpp.__version__} is installed, but edge-reft is "
                           f"built against {PINNED_VERSION} exactly (the eval-callback data path "
                           f"depends on it): pip install llama-cpp-python=={PINNED_VERSION}")


_LOG_CB = None


def quiet_logs(verbose: bool) -> None:
    """Route llama.cpp's log to nowhere unless ``verbose`` (the callback must outlive the process)."""
    global _LOG_CB
    if verbose or _LOG_CB is not None:
        return
    _LOG_CB = C.llama_log_callback(lambda level, text, user: None)
    C.llama_log_set(_LOG_CB, ctypes.c_void_p(0))


_BACKEND_READY = False


def backend_init() -> None:
    global _BACKEND_READY
    if not _BACKEND_READY:
        C.llama_backend_init()
        _BACKEND_READY = True


EvalCallback = C.ggml_backend_sched_eval_callback  # bool (*)(struct ggml_tensor *, bool ask, void *)


class Vocab:
    """A model's tokenizer, as llama.cpp runs it (the runtime and training share it)."""

    def __init__(self, ptr: int, close: object = None):
        self.ptr = ptr
        self.n_tokens = C.llama_vocab_n_tokens(ptr)
        self._close = close

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Vocab":
        """Only the vocabulary of a GGUF model (no weights): for tokenizing training data."""
        check_version()
        quiet_logs(False)
        backend_init()
        mp = C.llama_model_default_params()
        mp.vocab_only = True
        model = C.llama_model_load_from_file(os.fsencode(path), mp)
        if not model:
            raise BackendError(f"{path}: llama.cpp could not read this model's vocabulary")
        return cls(C.llama_model_get_vocab(model), lambda: C.llama_model_free(model))

    def close(self) -> None:
        if self._close is not None:
            self._close()
            self._close = None

    def tokenize(self, text: str, add_special: bool, parse_special: bool = True) -> list[int]:
        raw = text.encode("utf-8")
        cap = len(raw) + 8
        buf = (C.llama_token * cap)()
        n = C.llama_tokenize(self.ptr, raw, len(raw), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (C.llama_token * cap)()
            n = C.llama_tokenize(self.ptr, raw, len(raw), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def piece(self, token: int, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = C.llama_token_to_piece(self.ptr, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = C.llama_token_to_piece(self.ptr, token, buf, -n, 0, special)
        return buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        return bool(C.llama_vocab_is_eog(self.ptr, token))


class Native:
    """A model, its context and a batch; released together by ``close``."""

    def __init__(self, path: str | os.PathLike[str], *, n_ctx: int, n_ubatch: int, n_threads: int,
                 n_gpu_layers: int, flash_attn: bool, callback: EvalCallback | None,
                 callback_data: int | None = None, kv_f32: bool = False, op_offload: bool = True,
                 verbose: bool = False):
        check_version()
        quiet_logs(verbose)
        backend_init()
        self._stack = ExitStack()
        mp = C.llama_model_default_params()
        mp.n_gpu_layers = n_gpu_layers
        self.model = C.llama_model_load_from_file(os.fsencode(path), mp)
        if not self.model:
            raise BackendError(f"{path}: llama.cpp could not load this model (is it a GGUF model file?)")
        self._stack.callback(C.llama_model_free, self.model)
        cp = C.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, n_ubatch, n_ubatch, 1
        cp.n_threads = cp.n_threads_batch = n_threads
        cp.flash_attn_type = C.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else C.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.no_perf = True
        if kv_f32:  # exact parity with a float32 reference; F16 (the default) halves the cache
            cp.type_k = cp.type_v = GGML_TYPE_F32
        cp.swa_full = True  # sliding-window caches (gemma3) can then be cut back to any position
        cp.op_offload = op_offload  # llama.cpp's default: big batches of CPU-held layers run on a GPU
        self.callback = callback  # params are copied by value: this reference keeps the thunk alive
        if callback is not None:
            cp.cb_eval = callback
            cp.cb_eval_user_data = callback_data
        self.ctx = C.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise BackendError(f"{path}: llama.cpp could not create a context (n_ctx={n_ctx})")
        self._stack.callback(C.llama_free, self.ctx)
        self.vocab = Vocab(C.llama_model_get_vocab(self.model))
        self.memory = C.llama_get_memory(self.ctx)
        self.n_vocab = self.vocab.n_tokens
        self.n_embd = C.llama_model_n_embd(self.model)
        self.n_layer = C.llama_model_n_layer(self.model)
        self.n_ctx = C.llama_n_ctx(self.ctx)
        self.n_ubatch = C.llama_n_ubatch(self.ctx)
        self.batch = C.llama_batch_init(self.n_ubatch, 0, 1)
        self._stack.callback(C.llama_batch_free, self.batch)
        cap = self.n_ubatch
        self._tok = np.ctypeslib.as_array(self.batch.token, shape=(cap,))
        self._pos = np.ctypeslib.as_array(self.batch.pos, shape=(cap,))
        self._nseq = np.ctypeslib.as_array(self.batch.n_seq_id, shape=(cap,))
        self._out = np.ctypeslib.as_array(ctypes.cast(self.batch.logits, ctypes.POINTER(ctypes.c_int8)), shape=(cap,))
        for i in range(cap):
            self.batch.seq_id[i][0] = 0
        self._nseq[:] = 1

    def close(self) -> None:
        self._stack.close()

    # ---- decoding -----------------------------------------------------------------
    def decode(self, tokens: np.ndarray, start: int, outputs: np.ndarray) -> None:
        """One ubatch: ``tokens`` at positions start.., logits for rows where ``outputs``."""
        n = len(tokens)
        self._tok[:n] = tokens
        self._pos[:n] = np.arange(start, start + n, dtype=np.int32)
        self._out[:n] = outputs
        self.batch.n_tokens = n
        rc = C.llama_decode(self.ctx, self.batch)
        if rc != 0:
            raise BackendError(f"llama_decode failed with code {rc} (1 = no room in the KV cache: "
                               f"n_ctx is {self.n_ctx})")

    def logits(self, i: int) -> np.ndarray:
        ptr = C.llama_get_logits_ith(self.ctx, i)
        if not ptr:
            raise BackendError(f"llama.cpp returned no logits for output {i}")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def keep(self, n: int) -> bool:
        """Keep the first ``n`` positions of the KV cache; False if it cannot be cut there."""
        if n == 0:
            C.llama_memory_clear(self.memory, True)
            return True
        return bool(C.llama_memory_seq_rm(self.memory, 0, n, -1))

    def save_state(self) -> ctypes.Array:
        """The KV cache's cells (llama.cpp's per-sequence state) as a byte array."""
        size = C.llama_state_seq_get_size(self.ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        got = C.llama_state_seq_get_data(self.ctx, buf, size, 0)
        if got != size:
            raise BackendError(f"llama_state_seq_get_data wrote {got} of {size} bytes")
        return buf

    def load_state(self, buf: ctypes.Array) -> bool:
        """Replace the KV cache with a saved state; False (and an empty cache) if it failed."""
        C.llama_memory_clear(self.memory, True)
        if C.llama_state_seq_set_data(self.ctx, buf, len(buf), 0) == len(buf):
            return True
        C.llama_memory_clear(self.memory, True)
        return False

    # ---- llama.cpp's own adapters (oracle tests, benchmarks) ---------------------------
    def set_control_vector(self, vector: np.ndarray | None, layer: int) -> None:
        """Add ``vector`` at ``l_out`` of ``layer`` (>= 1) with llama.cpp's own control vectors."""
        if vector is None:
            rc = C.llama_set_adapter_cvec(self.ctx, None, 0, self.n_embd, -1, -1)
        else:
            data = np.zeros((self.n_layer - 1, self.n_embd), dtype=np.float32)  # starts at layer 1
            data[layer - 1] = vector
            self._cvec = data  # llama.cpp copies it, but keep it for the call's lifetime
            ptr = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            rc = C.llama_set_adapter_cvec(self.ctx, ptr, data.size, self.n_embd, layer, layer)
        if rc != 0:
            raise BackendError(f"llama_set_adapter_cvec failed ({rc})")

    def lora_init(self, path: str | os.PathLike[str]) -> int:
        adapter = C.llama_adapter_lora_init(self.model, os.fsencode(path))
        if not adapter:
            raise BackendError(f"{path}: llama.cpp could not load this LoRA adapter")
        return adapter

    def lora_set(self, adapter: int | None, scale: float = 1.0) -> None:
        if adapter is None:
            C.llama_set_adapters_lora(self.ctx, None, 0, None)
            return
        arr = (ctypes.POINTER(ctypes.c_void_p) * 1)(adapter)
        scales = (ctypes.c_float * 1)(scale)
        C.llama_set_adapters_lora(self.ctx, arr, 1, scales)


# ---- the native gate (runtime/gate.c): the eval callback in C ------------------------------
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
        self.state = lib.edge_gate_new(n_embd, _addr(ggml_get_name), _addr(ggml_nelements),
                                       _addr(ggml_is_contiguous), _addr(ggml_backend_tensor_get),
                                       _addr(ggml_backend_tensor_set))
        if not self.state:
            raise BackendError("the native gate could not allocate its state")
        self.callback = EvalCallback(_addr(lib.edge_gate_eval))
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
