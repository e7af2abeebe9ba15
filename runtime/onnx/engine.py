"""The ONNX Runtime engine: patches are graph inputs, fed per call.

The graph (``edge-reft export-onnx``) has, at each exported block, edit slots
whose rotate / delta_t / bias / mask are inputs with a batch axis, so a patch
swap is a different feed (no session is ever re-created) and one run can
serve a batch of requests that each carry their own patch
(``generate_batch``).

KV cache: one float32 buffer per layer and kind, (B, kv_heads, capacity,
head_dim), bound as both ``past_key_values.*`` and ``present.*`` through an
IOBinding; GroupQueryAttention sees the shared buffer and writes the new rows
in place at each row's length (taken from ``attention_mask``).  ``_keep(n)``
only moves the length.  A block whose masks are all zero in a call is switched
off (``reft.L.on``) and runs the builder's graph alone.  Needs onnxruntime,
numpy and tokenizers, never torch.
"""
from __future__ import annotations

import os
import time
from typing import Sequence

import numpy as np

from edge_reft.chat import ChatTemplate
from edge_reft.errors import BackendError, ReftError
from edge_reft.hftokenizer import HFTokenizer

from ..edits import PatchSet
from ..engine import Completion, EngineBase, PatchLike, Reply
from ..kvstates import ArrayState
from ..sampling import SamplingParams, sampling_params
from .native import Binding, Export, KVCache


class OnnxEngine(EngineBase):
    """Generate with an export-onnx folder through onnxruntime, applying patches per call."""

    decode_rows_reusable = False  # MLAS: one-row MatMuls round otherwise (see EngineBase)

    def __init__(self, model: str | os.PathLike[str], *, n_ctx: int = 2048, n_threads: int | None = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",), state_cache_mb: float = 64.0,
                 verbose: bool = False):
        super().__init__(state_cache_mb)
        import onnxruntime as ort
        if model is None or not os.path.isdir(model):
            raise ReftError(f"{model}: the ONNX backend takes a folder made by `edge-reft export-onnx`")
        self.export = Export(model)
        self.base = self.export.base
        if not 1 <= n_ctx <= self.export.context_length:
            raise ReftError(f"n_ctx: {n_ctx}, expected 1..{self.export.context_length} for this model")
        self.n_ctx = self.n_ubatch = n_ctx
        try:
            self.chat: ChatTemplate | None = ChatTemplate.from_hf_dir(model)
        except ReftError:
            self.chat = None
        self.vocab = HFTokenizer(self.export.folder)
        so = ort.SessionOptions()
        if verbose:
            so.log_severity_level = 0
        if n_threads:
            so.intra_op_num_threads = n_threads
        try:
            self.session = ort.InferenceSession(str(self.export.model_path), so, providers=list(providers))
        except Exception as e:  # onnxruntime raises its own exception types
            raise BackendError(f"{self.export.model_path}: onnxruntime cannot load it: {e}") from None
        names = {i.name for i in self.session.get_inputs()}
        self.kv_inputs = {n: "present" + n[len("past_key_values"):] for n in sorted(names)
                          if n.startswith("past_key_values.")}
        missing = [n for n in [*(s.inputs[k] for s in self.export.sites for k in s.inputs),
                               *self.export.switches.values()] if n not in names]
        if missing or not self.kv_inputs:
            raise BackendError(f"{self.export.model_path}: the graph lacks inputs the manifest names: "
                               f"{missing[:4] or 'past_key_values.*'}")
        self.vocab_size = int(self.session.get_outputs()[0].shape[-1])
        self.kv = self.new_kv(1, n_ctx)
        self._n_past = 0
        self._weights_key: str | None = None

    def new_kv(self, batch: int, capacity: int) -> KVCache:
        """Zeroed past/present buffers for ``batch`` sequences of up to ``capacity`` tokens."""
        return KVCache(self.session, self.kv_inputs, batch, capacity, self.export)

    def runtime_notes(self) -> str:
        return f"onnxruntime {self.session.get_providers()}; export {self.export.precision}"

    def close(self) -> None:
        self._states.clear()
        self.session = self.kv = None  # the session and the KV buffers go with the last reference

    def _check_open(self) -> None:
        if self.session is None:
            raise ReftError(f"{self.export.folder}: this engine is closed")

    # ---- backend primitives ----------------------------------------------------------------
    def _tokenize(self, text: str, add_special: bool) -> list[int]:
        return self.vocab.encode(text, add_special)

    def _tokenize_text(self, text: str) -> list[int]:
        return self.vocab.encode_text(text)

    def _piece(self, token: int) -> bytes:
        return self.vocab.piece(token)

    def _is_eog(self, token: int) -> bool:
        return self.vocab.is_eog(token)

    def _keep(self, n: int, seq: int = 0) -> bool:  # one sequence: seq is 0
        if n > self._n_past:
            return False
        self._n_past = n
        return True

    def _save_state(self, seq: int = 0) -> ArrayState:
        n = self._n_past
        return ArrayState({k: b[:, :, :n].copy() for k, b in self.kv.buffers.items()}, n)

    def _load_state(self, state: ArrayState, seq: int = 0) -> bool:
        for k, a in state.arrays.items():
            self.kv.buffers[k][:, :, :state.n] = a
        self._n_past = state.n
        return True

    def patch_set(self, patch: PatchLike | Sequence[PatchLike], allow_mismatch: bool = False) -> PatchSet:
        pset = super().patch_set(patch, allow_mismatch)
        self.export.check(pset)
        return pset

    def _forward(self, tokens: Sequence[int], start: int, n_prompt: int, pset: PatchSet,
                 all_logits: bool = False) -> np.ndarray:
        n = len(tokens)
        self._check_open()
        if start != self._n_past:
            raise BackendError(f"internal: a chunk at position {start}, but the KV cache holds {self._n_past}")
        if start + n > self.kv.capacity:
            raise ReftError(f"{start + n} tokens exceed the context of {self.kv.capacity} (n_ctx)")
        io = self.kv.all
        if self._weights_key != pset.key:
            self._weights_key = None  # a failure below must not leave stale weights marked as bound
            io.feed(self.export.batch_weights([pset], self.base.n_embd))
            self._weights_key = pset.key
        io.feed(self.export.masks([pset], [start], n, [n_prompt]))
        logits = self._run_graph(io, np.asarray([tokens], np.int64), [start + n], 0 if all_logits else n - 1)
        self._n_past = start + n
        return logits[0]

    # ---- running the graph ----------------------------------------------------------------
    def _run_graph(self, b: "Binding", ids: np.ndarray, totals: Sequence[int], logits_start: int) -> np.ndarray:
        """Run ``ids`` (B, n); row r's sequence is then ``totals[r]`` long.  Logits from
        position ``logits_start`` of the chunk on: (B, n - logits_start, vocab)."""
        mask = (np.arange(max(totals))[None, :] < np.asarray(totals)[:, None]).astype(np.int64)
        b.feed({"input_ids": ids, "attention_mask": mask,
                self.export.logits_start: np.array([logits_start], np.int64)})
        out = b.logits_out((ids.shape[0], ids.shape[1] - logits_start, self.vocab_size))
        try:
            self.session.run_with_iobinding(b.io)
        except Exception as e:  # onnxruntime raises its own exception types
            raise BackendError(f"onnxruntime failed on {self.export.model_path}: {e}") from None
        return out.copy()

    # ---- batches ----------------------------------------------------------------------------
    def generate_batch(self, prompts: Sequence[str] | None = None, *,
                       messages: Sequence[Sequence[dict]] | None = None,
                       patches: Sequence[PatchLike | Sequence[PatchLike]] | None = None,
                       max_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                       seed: int | None = None, stop: Sequence[str] = (), raw: bool = False,
                       prompt_tokens: Sequence[Sequence[int]] | None = None,
                       **sampling: float) -> list[Completion]:
        """Generate for several prompts at once, row b with ``patches[b]`` (a patch, a path,
        a list of them, or None); one graph run per decode step serves every row.

        Each row's result equals ``generate(prompts[b], patch=patches[b], ...)``; the
        engine's conversation cache is left as it was."""
        if sum(x is not None for x in (prompts, messages, prompt_tokens)) != 1:
            raise ReftError("generate_batch: give exactly one of prompts=, messages= or prompt_tokens=")
        if prompt_tokens is not None:
            toks = [list(t) for t in prompt_tokens]
        elif prompts is not None:
            toks = [self.prompt_tokens(p, raw=raw) for p in prompts]
        else:
            toks = [self.prompt_tokens(messages=m) for m in messages]
        if not toks or not all(toks):
            raise ReftError("generate_batch: no prompts, or an empty one (0 tokens); a patch needs "
                            "prompt tokens to edit")
        if not isinstance(max_tokens, int) or max_tokens < 0:
            raise ReftError(f"max_tokens: {max_tokens!r}, expected an integer >= 0")
        patches = [None] * len(toks) if patches is None else list(patches)
        if len(patches) != len(toks):
            raise ReftError(f"generate_batch: {len(toks)} prompts but {len(patches)} patches "
                            "(give one per prompt; None for no patch)")
        psets = [self.patch_set(p) for p in patches]
        capacity = max(map(len, toks)) + max_tokens
        if capacity > self.n_ctx:
            raise ReftError(f"the longest prompt ({max(map(len, toks))} tokens) plus max_tokens "
                            f"({max_tokens}) exceeds the context of {self.n_ctx} tokens")
        params = sampling_params(temperature, top_p, top_k, seed, **sampling)
        self._check_open()
        with self._exclusive():
            return self._batch(toks, psets, params, max_tokens, stop, capacity)

    def _batch(self, toks: list[list[int]], psets: list[PatchSet], params: SamplingParams,
               max_tokens: int, stop: Sequence[str], capacity: int) -> list[Completion]:
        B, d = len(toks), self.base.n_embd
        kv = self.new_kv(B, capacity)
        t0 = time.perf_counter()
        last = []
        for b in range(B):  # prefill row by row: no padding, each exactly as a single run
            row = kv.binding(slice(b, b + 1))
            n = len(toks[b])
            row.feed(self.export.batch_weights([psets[b]], d))
            row.feed(self.export.masks([psets[b]], [0], n, [n]))
            last.append(self._run_graph(row, np.asarray([toks[b]], np.int64), [n], n - 1)[0, -1])
        t1 = time.perf_counter()
        kv.all.feed(self.export.batch_weights(psets, d))
        replies = [Reply(self, params, stop) for _ in range(B)]
        logits = np.stack(last)
        for i in range(max_tokens):
            step = [0] * B  # finished rows run along (ignored) to keep one batch
            for b, reply in enumerate(replies):
                if not reply.done:
                    step[b] = reply.step(logits[b])[0]
            if all(r.done for r in replies) or i + 1 == max_tokens:
                break
            pos = [len(t) + i for t in toks]
            kv.all.feed(self.export.masks(psets, pos, 1, [len(t) for t in toks]))
            logits = self._run_graph(kv.all, np.asarray(step, np.int64)[:, None], [p + 1 for p in pos], 0)[:, -1]
        t2 = time.perf_counter()
        for r in replies:
            r.text.close()
        return [r.completion(toks[b], t1 - t0, t2 - t1, 0) for b, r in enumerate(replies)]
