"""The thin native layer: every ctypes call and pointer of the llama.cpp backend.

llama-cpp-python (pinned exactly: 0.3.36) mirrors llama.h one-to-one in
``llama_cpp.llama_cpp``; the few ggml functions the edit needs live in
libggml-base and libggml are declared here (found by llama-cpp-python's own
loader, so the file names are whatever the platform uses).  Native resources are owned by small
classes released through an ``ExitStack``; everything above this module is
plain Python and numpy.
"""
from __future__ import annotations

import ctypes
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import llama_cpp
import llama_cpp.llama_cpp as C
import numpy as np
from llama_cpp._ctypes_extensions import load_shared_library

from edge_reft.errors import BackendError

PINNED_VERSION = "0.3.36"
GGML_TYPE_F32 = 0
GGML_BACKEND_DEVICE_TYPE_CPU = 0
# llama-cpp-python's own lib/ folder, or LLAMA_CPP_LIB_PATH as llama_cpp itself honours it
LIB_DIR = Path(os.environ.get("LLAMA_CPP_LIB_PATH") or Path(llama_cpp.__file__).parent / "lib")

# ggml-base: tensor access that also works for GPU (CUDA/Metal/Vulkan) buffers; ggml: the
# backend registry.  llama-cpp-python's loader knows each platform's file name and search path.
_ggml_base = load_shared_library("ggml-base", LIB_DIR)
_ggml = load_shared_library("ggml", LIB_DIR)


def _fn(lib: ctypes.CDLL, name: str, argtypes: list, restype: object) -> Any:
    f = getattr(lib, name)
    f.argtypes, f.restype = argtypes, restype
    return f


_p = ctypes.c_void_p
# const char * ggml_get_name(const struct ggml_tensor * tensor);
ggml_get_name = _fn(_ggml_base, "ggml_get_name", [_p], ctypes.c_char_p)
# int64_t ggml_nelements(const struct ggml_tensor * tensor);
ggml_nelements = _fn(_ggml_base, "ggml_nelements", [_p], ctypes.c_int64)
# size_t ggml_nbytes(const struct ggml_tensor * tensor);
ggml_nbytes = _fn(_ggml_base, "ggml_nbytes", [_p], ctypes.c_size_t)
# bool ggml_is_contiguous(const struct ggml_tensor * tensor);
ggml_is_contiguous = _fn(_ggml_base, "ggml_is_contiguous", [_p], ctypes.c_bool)
# void ggml_backend_tensor_get(const struct ggml_tensor * tensor, void * data, size_t offset, size_t size);
ggml_backend_tensor_get = _fn(_ggml_base, "ggml_backend_tensor_get", [_p, _p, ctypes.c_size_t, ctypes.c_size_t], None)
# void ggml_backend_tensor_set(struct ggml_tensor * tensor, const void * data, size_t offset, size_t size);
ggml_backend_tensor_set = _fn(_ggml_base, "ggml_backend_tensor_set", [_p, _p, ctypes.c_size_t, ctypes.c_size_t], None)
# ggml_backend_dev_t ggml_backend_dev_by_type(enum ggml_backend_dev_type type);
ggml_backend_dev_by_type = _fn(_ggml, "ggml_backend_dev_by_type", [ctypes.c_int], _p)
# ggml_backend_reg_t ggml_backend_dev_backend_reg(ggml_backend_dev_t device);
ggml_backend_dev_backend_reg = _fn(_ggml_base, "ggml_backend_dev_backend_reg", [_p], _p)
# void * ggml_backend_reg_get_proc_address(ggml_backend_reg_t reg, const char * name);
ggml_backend_reg_get_proc_address = _fn(_ggml_base, "ggml_backend_reg_get_proc_address", [_p, ctypes.c_char_p], _p)
# const char * ggml_backend_buft_name(ggml_backend_buffer_type_t buft);
ggml_backend_buft_name = _fn(_ggml_base, "ggml_backend_buft_name", [_p], ctypes.c_char_p)
# typedef ggml_backend_buffer_type_t * (*ggml_backend_dev_get_extra_bufts_t)(ggml_backend_dev_t device);
_GetExtraBufts = ctypes.CFUNCTYPE(ctypes.POINTER(_p), _p)


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


# ---- CPU weight repacking (llama.cpp's "extra buffer types") ----------------------------------
def cpu_extra_bufts() -> list[str]:
    """Names of the CPU backend's extra buffer types, as llama.cpp's loader would use them
    (llama-model.cpp make_cpu_buft_list): e.g. "AMX", "CPU_REPACK", "CPU_KLEIDIAI"."""
    backend_init()
    dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)
    if not dev:
        return []
    addr = ggml_backend_reg_get_proc_address(ggml_backend_dev_backend_reg(dev), b"ggml_backend_dev_get_extra_bufts")
    if not addr:
        return []
    arr, names = _GetExtraBufts(addr)(dev), []
    i = 0
    while arr and arr[i]:
        names.append(ggml_backend_buft_name(arr[i]).decode())
        i += 1
    return names


# ---- model, contexts -------------------------------------------------------------------------
class Model:
    """A llama.cpp model (weights and vocabulary), shared by the contexts made from it."""

    def __init__(self, path: str | os.PathLike[str], *, n_gpu_layers: int, use_extra_bufts: bool = True,
                 verbose: bool = False):
        check_version()
        quiet_logs(verbose)
        backend_init()
        mp = C.llama_model_default_params()
        mp.n_gpu_layers = n_gpu_layers
        mp.use_extra_bufts = use_extra_bufts
        self.ptr = C.llama_model_load_from_file(os.fsencode(path), mp)
        if not self.ptr:
            raise BackendError(f"{path}: llama.cpp could not load this model (is it a GGUF model file?)")
        self.vocab = Vocab(C.llama_model_get_vocab(self.ptr))
        self.n_vocab = self.vocab.n_tokens
        self.n_embd = C.llama_model_n_embd(self.ptr)
        self.n_layer = C.llama_model_n_layer(self.ptr)

    def close(self) -> None:
        if self.ptr:
            C.llama_model_free(self.ptr)
            self.ptr = None


class Context:
    """One llama.cpp context (its KV cache holds sequences 0 .. n_seq-1) and a batch for it."""

    def __init__(self, model: Model, *, n_ctx: int, n_ubatch: int, n_threads: int, flash_attn: bool | None,
                 callback: EvalCallback | None, callback_data: int | None = None, kv_f32: bool = False,
                 op_offload: bool = True, n_seq: int = 1, kv_unified: bool = False):
        self._stack = ExitStack()
        cp = C.llama_context_default_params()
        # n_batch = n_ubatch: a decode is one ubatch, so l_out's rows are the tokens submitted
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, n_ubatch, n_ubatch, n_seq
        # kv_unified False: a KV stream per sequence, each sequence's cells in position order from
        # cell 0 as in a context of its own, so its attention sums round as they would alone (in
        # one shared stream its cells land wherever others left room, and the sums round
        # otherwise); llama.cpp then splits a batch "equally" (a ubatch holds as many tokens of
        # each of consecutive sequences).  True: one stream, a batch split in order (any mix of
        # sequences in one ubatch), cells shared between sequences by seq_cp.
        cp.kv_unified = kv_unified
        cp.n_threads = cp.n_threads_batch = n_threads
        cp.flash_attn_type = (C.LLAMA_FLASH_ATTN_TYPE_AUTO if flash_attn is None else  # llama.cpp decides
                              C.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else C.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        cp.no_perf = True
        if kv_f32:  # exact parity with a float32 reference; F16 (the default) halves the cache
            cp.type_k = cp.type_v = GGML_TYPE_F32
        cp.swa_full = True  # sliding-window caches (gemma3) can then be cut back to any position
        cp.op_offload = op_offload  # llama.cpp's default: big batches of CPU-held layers run on a GPU
        self.callback = callback  # params are copied by value: this reference keeps the thunk alive
        if callback is not None:
            cp.cb_eval = callback
            cp.cb_eval_user_data = callback_data
        self.ptr = C.llama_init_from_model(model.ptr, cp)
        if not self.ptr:
            raise BackendError(f"llama.cpp could not create a context (n_ctx={n_ctx})")
        self._stack.callback(C.llama_free, self.ptr)
        self.n_vocab = model.n_vocab
        self.memory = C.llama_get_memory(self.ptr)
        self.n_ctx = C.llama_n_ctx(self.ptr)
        self.n_ubatch = C.llama_n_ubatch(self.ptr)
        self.n_seq, self.kv_unified = n_seq, kv_unified
        self.batch = C.llama_batch_init(self.n_ubatch, 0, 1)
        self._stack.callback(C.llama_batch_free, self.batch)
        cap = self.n_ubatch
        self._tok = np.ctypeslib.as_array(self.batch.token, shape=(cap,))
        self._pos = np.ctypeslib.as_array(self.batch.pos, shape=(cap,))
        self._nseq = np.ctypeslib.as_array(self.batch.n_seq_id, shape=(cap,))
        self._out = np.ctypeslib.as_array(ctypes.cast(self.batch.logits, ctypes.POINTER(ctypes.c_int8)), shape=(cap,))
        self._seq = np.zeros(cap, dtype=np.int32)  # what batch.seq_id[i][0] holds
        for i in range(cap):
            self.batch.seq_id[i][0] = 0
        self._nseq[:] = 1

    def close(self) -> None:
        self._stack.close()

    def decode(self, tokens: np.ndarray, start: int | np.ndarray, outputs: np.ndarray,
               seq: int | np.ndarray = 0) -> None:
        """One ubatch: ``tokens`` at positions ``start``.. (or one position per token) of
        sequence ``seq`` (or one per token), logits for rows where ``outputs``."""
        n = len(tokens)
        self._tok[:n] = tokens
        self._pos[:n] = np.arange(start, start + n, dtype=np.int32) if np.ndim(start) == 0 else start
        self._out[:n] = outputs
        seqs = np.broadcast_to(np.asarray(seq, dtype=np.int32), (n,))
        for i in np.flatnonzero(self._seq[:n] != seqs):
            self.batch.seq_id[i][0] = self._seq[i] = seqs[i]
        self.batch.n_tokens = n
        rc = C.llama_decode(self.ptr, self.batch)
        if rc != 0:
            raise BackendError(f"llama_decode failed with code {rc} (1 = no room in the KV cache: "
                               f"n_ctx is {self.n_ctx})")

    def logits(self, i: int) -> np.ndarray:
        ptr = C.llama_get_logits_ith(self.ptr, i)
        if not ptr:
            raise BackendError(f"llama.cpp returned no logits for output {i}")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def n_cached(self, seq: int = 0) -> int:
        """Positions held for sequence ``seq`` (0 when empty)."""
        return int(C.llama_memory_seq_pos_max(self.memory, seq)) + 1

    def keep(self, n: int, seq: int = 0) -> bool:
        """Keep the first ``n`` positions of sequence ``seq``; False if it cannot be cut there.
        A one-sequence context is cleared whole at 0, so a new prompt lands in the same cells
        as in a fresh context (placement changes how the attention's sums round)."""
        if n == 0 and self.n_seq == 1:
            C.llama_memory_clear(self.memory, True)
            return True
        return bool(C.llama_memory_seq_rm(self.memory, seq, n, -1))

    def copy(self, src: int, dst: int, n: int) -> None:
        """Sequence ``dst`` becomes the first ``n`` positions of ``src``: in one stream the cells
        are shared; between streams llama.cpp copies the whole stream (at the next decode) and
        the rest is cut."""
        C.llama_memory_seq_rm(self.memory, dst, -1, -1)
        if self.kv_unified:
            C.llama_memory_seq_cp(self.memory, src, dst, 0, n)
            return
        C.llama_memory_seq_cp(self.memory, src, dst, -1, -1)
        C.llama_memory_seq_rm(self.memory, dst, n, -1)

    def save_state(self, seq: int = 0) -> ctypes.Array:
        """Sequence ``seq``'s KV cells (llama.cpp's per-sequence state) as a byte array."""
        size = C.llama_state_seq_get_size(self.ptr, seq)
        buf = (ctypes.c_uint8 * size)()
        got = C.llama_state_seq_get_data(self.ptr, buf, size, seq)
        if got != size:
            raise BackendError(f"llama_state_seq_get_data wrote {got} of {size} bytes")
        return buf

    def load_state(self, buf: ctypes.Array, seq: int = 0) -> bool:
        """Replace sequence ``seq`` with a saved state; False (and ``seq`` empty) if it failed."""
        self.keep(0, seq)
        if C.llama_state_seq_set_data(self.ptr, buf, len(buf), seq) == len(buf):
            return True
        self.keep(0, seq)
        return False


class Native:
    """A model and the contexts that decode its sequences; released together by ``close``.

    ``edit`` has the eval callback.  ``plain`` (optional, same model) has none: on a GPU
    merely having ``cb_eval`` costs ~6 % per token even when it asks for nothing (the
    scheduler then computes each split as graph views, synchronizing after each), so decode
    steps that edit nothing run in ``plain``.  The sequence lives in one context at a time
    (``home``); it moves with llama_state_seq_get/set_data, which copies the KV cells
    bit for bit, when the next ubatch needs the other context.
    """

    def __init__(self, path: str | os.PathLike[str], *, n_ctx: int, n_ubatch: int, n_threads: int,
                 n_gpu_layers: int, flash_attn: bool | None, callback: EvalCallback | None,
                 callback_data: int | None = None, kv_f32: bool = False, op_offload: bool = True,
                 split: bool = False, use_extra_bufts: bool = True, verbose: bool = False, n_seq: int = 1,
                 kv_unified: bool = False):
        if split and n_seq > 1:
            raise BackendError("a split (edit / plain) pair of contexts holds one sequence; n_seq must be 1")
        self._stack = ExitStack()
        self.model = Model(path, n_gpu_layers=n_gpu_layers, use_extra_bufts=use_extra_bufts, verbose=verbose)
        self._stack.callback(self.model.close)
        kw = dict(n_ctx=n_ctx, n_ubatch=n_ubatch, n_threads=n_threads, flash_attn=flash_attn,
                  kv_f32=kv_f32, op_offload=op_offload, n_seq=n_seq, kv_unified=kv_unified)
        try:
            self.edit = Context(self.model, callback=callback, callback_data=callback_data, **kw)
            self._stack.callback(self.edit.close)
            self.plain = self.edit
            if split and callback is not None:
                self.plain = Context(self.model, callback=None, **kw)
                self._stack.callback(self.plain.close)
        except BaseException:
            self._stack.close()
            raise
        self.home = self.edit
        self.moves = 0  # sequence moves between the contexts (for tests and benchmarks)
        self.vocab, self.n_vocab = self.model.vocab, self.model.n_vocab
        self.n_embd, self.n_layer = self.model.n_embd, self.model.n_layer
        self.n_ctx, self.n_ubatch = self.edit.n_ctx, self.edit.n_ubatch

    @property
    def split(self) -> bool:
        return self.plain is not self.edit

    def close(self) -> None:
        self._stack.close()

    def use(self, edit: bool) -> Context:
        """The context for the next ubatch, with the sequence moved there if needed."""
        target = self.edit if edit else self.plain
        if target is not self.home:
            if self.home.n_cached():
                if not target.load_state(self.home.save_state()):
                    raise BackendError("llama.cpp could not move the KV cache between contexts")
                self.moves += 1
            else:
                target.keep(0)
            self.home.keep(0)
            self.home = target
        return target

    def decode(self, tokens: np.ndarray, start: int | np.ndarray, outputs: np.ndarray, edit: bool = True,
               seq: int | np.ndarray = 0) -> None:
        self.use(edit).decode(tokens, start, outputs, seq)

    def logits(self, i: int) -> np.ndarray:
        return self.home.logits(i)

    def keep(self, n: int, seq: int = 0) -> bool:
        return self.home.keep(n, seq)

    def copy(self, src: int, dst: int, n: int) -> None:
        self.home.copy(src, dst, n)

    def save_state(self, seq: int = 0) -> ctypes.Array:
        return self.home.save_state(seq)

    def load_state(self, buf: ctypes.Array, seq: int = 0) -> bool:
        return self.home.load_state(buf, seq)

    # ---- llama.cpp's own adapters (oracle tests, benchmarks): set on every context -----------
    def _contexts(self) -> tuple[Context, ...]:
        return (self.edit, self.plain) if self.split else (self.edit,)

    def set_control_vector(self, vector: np.ndarray | None, layer: int) -> None:
        """Add ``vector`` at ``l_out`` of ``layer`` (>= 1) with llama.cpp's own control vectors."""
        for ctx in self._contexts():
            if vector is None:
                rc = C.llama_set_adapter_cvec(ctx.ptr, None, 0, self.n_embd, -1, -1)
            else:
                data = np.zeros((self.n_layer - 1, self.n_embd), dtype=np.float32)  # starts at layer 1
                data[layer - 1] = vector
                ptr = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))  # llama.cpp copies it
                rc = C.llama_set_adapter_cvec(ctx.ptr, ptr, data.size, self.n_embd, layer, layer)
            if rc != 0:
                raise BackendError(f"llama_set_adapter_cvec failed ({rc})")

    def lora_init(self, path: str | os.PathLike[str]) -> int:
        adapter = C.llama_adapter_lora_init(self.model.ptr, os.fsencode(path))
        if not adapter:
            raise BackendError(f"{path}: llama.cpp could not load this LoRA adapter")
        return adapter

    def lora_set(self, adapter: int | None, scale: float = 1.0) -> None:
        for ctx in self._contexts():
            if adapter is None:
                C.llama_set_adapters_lora(ctx.ptr, None, 0, None)
                continue
            arr = (ctypes.POINTER(ctypes.c_void_p) * 1)(adapter)
            scales = (ctypes.c_float * 1)(scale)
            C.llama_set_adapters_lora(ctx.ptr, arr, 1, scales)
