"""Compute once what a patch cannot change; start every training step from it.

A patch edits blocks >= L (its lowest layer) at positions >= p (the first
position any of its rules selects).  The model being causal, nothing before
position p depends on the patch at any block, and nothing below block L
depends on it at any position.  So, per example, one forward of the frozen
model gives: the input of block L at positions p.. (``h``) and the keys and
values of positions < p at blocks L.. (``k``, ``v``).  A step then runs only
positions p.. through blocks L.. on top of those keys and values.  For an
``l1`` patch at block 15 of 30 that is 1 prompt token plus the reply through
half the model, instead of the whole sequence through all of it.

Entries live in memory up to a byte budget and on disk past it.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from edge_reft.dataset import Example


@dataclass
class Entry:
    p0: int              # first edited position
    h: np.ndarray        # (T - p0, d): input of block L at positions p0..T-1
    k: np.ndarray        # (n_active, H_kv, p0, head_dim): keys of positions < p0, blocks L..
    v: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.h.nbytes + self.k.nbytes + self.v.nbytes


class PrefixCache:
    def __init__(self, budget_bytes: int, spill_dir: str | Path | None = None):
        self.budget, self.used = budget_bytes, 0
        self.memory: dict[int, Entry] = {}
        self.disk: dict[int, tuple[int, Path]] = {}
        self._dir = spill_dir
        self._tmp: tempfile.TemporaryDirectory | None = None

    def put(self, i: int, e: Entry) -> None:
        if self.used + e.nbytes <= self.budget:
            self.memory[i] = e
            self.used += e.nbytes
            return
        if self._dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="edge-reft-prefix-")
            self._dir = self._tmp.name
        path = Path(self._dir) / f"{i}.npz"
        np.savez(path, h=e.h, k=e.k, v=e.v)
        self.disk[i] = (e.p0, path)

    def get(self, i: int) -> Entry:
        e = self.memory.get(i)
        if e is not None:
            return e
        p0, path = self.disk[i]
        with np.load(path) as z:
            return Entry(p0, z["h"], z["k"], z["v"])

    def __len__(self) -> int:
        return len(self.memory) + len(self.disk)

    def drop(self, keys: Sequence[int]) -> None:
        """Forget ``keys`` (their memory and their spilled files)."""
        for i in keys:
            e = self.memory.pop(i, None)
            if e is not None:
                self.used -= e.nbytes
            spilled = self.disk.pop(i, None)
            if spilled is not None:
                spilled[1].unlink(missing_ok=True)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


class Slice:
    """One user's entries in a cache a fleet shares: its example i is the cache's ``offset + i``."""

    def __init__(self, cache: PrefixCache, offset: int, n: int):
        self.cache, self.offset, self.n = cache, offset, n

    def get(self, i: int) -> Entry:
        return self.cache.get(self.offset + i)

    def drop(self) -> None:
        self.cache.drop(range(self.offset, self.offset + self.n))

    def close(self) -> None:
        self.drop()


def pad_batch(seqs: Sequence[Sequence[int]], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (pad 0) and the matching attention mask, on ``device``."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids.to(device), mask.to(device)


SHARED_MIN = 8  # a common head shorter than this (tokens) is not worth a pass of its own


@torch.no_grad()
def build(model: Any, examples: Sequence[Example], first_layer: int,
          first_edited: Callable[[int], int] | Sequence[int], cache: PrefixCache, batch: int = 8,
          progress: Callable[[int], None] = lambda n: None, keys: Sequence[int] | None = None,
          shared_min: int = SHARED_MIN) -> None:
    """Frozen forwards of ``examples`` (batched, right-padded) fill ``cache`` under ``keys``
    (default: the example's index).  ``first_edited``: a prompt length's first edited
    position, or each example's own (examples of several users train in one fleet).

    Examples with a common head before their first edited position (a chat template's system
    turn, an instruction) are batched together, and the head runs once per batch: its keys
    and values are the same for every example whatever follows (the model is causal), so
    only the rest of each example runs as a batch on top of them.  On templated data that is
    most of the prompt (SST-2 in SmolLM2's template: 44 of 74 tokens)."""
    from .hf import decoder_layers
    cfg = model.config.get_text_config()
    n_layer, n_kv = cfg.num_hidden_layers, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    layers = decoder_layers(model)
    device = model_device(model)
    p0s = list(first_edited) if not callable(first_edited) else [first_edited(len(e.prompt)) for e in examples]
    keys = list(range(len(examples))) if keys is None else list(keys)
    for idx in _batches(examples, p0s, batch):
        chunk = [examples[i] for i in idx]
        s = _common_head(chunk, [p0s[i] for i in idx])
        s = s if s >= shared_min else 0
        past = _head_cache(model, chunk[0].tokens[:s], len(chunk)) if s else None
        ids, mask = pad_batch([e.tokens[s:] for e in chunk], device)
        pos = None
        if s:
            mask = torch.cat([torch.ones(len(chunk), s, dtype=mask.dtype, device=device), mask], 1)
            pos = (s + torch.arange(ids.shape[1], device=device)).expand(len(chunk), -1)
        # with nothing to cache above (every edit starts at position 0), the blocks from
        # first_layer up are not needed at all
        upper = range(first_layer, n_layer) if all(p0s[i] == 0 for i in idx) else ()
        kept = {L: layers[L] for L in upper}
        for L in upper:
            layers[L] = _Passthrough()
        captured: dict[str, torch.Tensor] = {}  # the input of block first_layer, as it is handed over
        grab = layers[first_layer].register_forward_pre_hook(lambda m, args: captured.setdefault("h", args[0]))
        try:  # the decoder only: the LM head over every position would cost more than the blocks
            out = model.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=past,
                              use_cache=True)
        finally:
            grab.remove()
            for L, m in kept.items():
                layers[L] = m
        h_all = captured["h"]  # positions s..
        kv = out.past_key_values  # positions 0.. (the head's included)
        for j, (i, e) in enumerate(zip(idx, chunk)):
            p0, t = p0s[i], len(e.tokens)
            if p0 == 0:
                k = v = np.zeros((n_layer - first_layer, n_kv, 0, head_dim), np.float32)
            else:
                k = _host(torch.stack([kv.layers[L].keys[j, :, :p0] for L in range(first_layer, n_layer)]))
                v = _host(torch.stack([kv.layers[L].values[j, :, :p0] for L in range(first_layer, n_layer)]))
            cache.put(keys[i], Entry(p0, _host(h_all[j, p0 - s:t - s]), k, v))
        progress(len(chunk))


def _batches(examples: Sequence[Example], p0s: Sequence[int], batch: int) -> list[list[int]]:
    """Batches of example indices: sorted by the tokens before their first edited position, so
    neighbours share the longest heads; within runs of 8 batches, by length (less padding)."""
    order = sorted(range(len(examples)), key=lambda i: examples[i].tokens[:p0s[i]])
    out = []
    for w in range(0, len(order), 8 * batch):
        run = sorted(order[w:w + 8 * batch], key=lambda i: len(examples[i].tokens))
        out += [run[i:i + batch] for i in range(0, len(run), batch)]
    return out


def _common_head(chunk: Sequence[Example], p0s: Sequence[int]) -> int:
    """Tokens every example of ``chunk`` starts with, none of them edited."""
    return min(len(os.path.commonprefix([list(e.tokens) for e in chunk])), *p0s)


def _head_cache(model: Any, head: Sequence[int], rows: int) -> Any:
    """A cache holding ``head``'s keys and values at every block, for ``rows`` rows."""
    from transformers import DynamicCache
    cfg = model.config.get_text_config()
    ids = torch.tensor([list(head)], device=model_device(model))
    one = model.model(input_ids=ids, use_cache=True).past_key_values
    past = DynamicCache(config=cfg)
    for L, layer in enumerate(one.layers):
        past.update(layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1), L)
    return past


def room(model: Any, otherwise: int) -> int:
    """Bytes a cache or a step may take: half the free memory of the model's CUDA device, or
    ``otherwise`` (CPU, MPS: no free-memory figure worth trusting)."""
    device = model_device(model)
    return torch.cuda.mem_get_info(device)[0] // 2 if device.type == "cuda" else otherwise


def model_device(model: Any) -> torch.device:
    """Where the backbone computes (its buffers and parameters all live on one device)."""
    for t in model.buffers():
        return t.device
    return next(model.parameters()).device


def _host(t: torch.Tensor) -> np.ndarray:
    """A float32 numpy copy in host memory (the cache lives there, whatever the device)."""
    return t.detach().to("cpu", torch.float32).numpy().copy()


class _Passthrough(torch.nn.Module):
    """Stands in for the blocks below the patch: their output is in the cache."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


def cached_forward(model: Any, entries: Sequence[Entry], first_layer: int) -> torch.Tensor:
    """Final-normed hidden states (B, S, d) of positions p0.. of each example, computed from
    the cache through blocks >= first_layer only (rows right-padded to S)."""
    from transformers import DynamicCache

    from .hf import decoder_layers
    cfg = model.config.get_text_config()
    P = max(e.p0 for e in entries)
    S = max(e.h.shape[0] for e in entries)
    B, d = len(entries), entries[0].h.shape[1]
    h = torch.zeros(B, S, d)
    mask = torch.zeros(B, P + S, dtype=torch.long)
    pos = torch.zeros(B, S, dtype=torch.long)
    n_active, n_kv, _, hd = entries[0].k.shape
    keys = torch.zeros(n_active, B, n_kv, P, hd)
    vals = torch.zeros(n_active, B, n_kv, P, hd)
    for i, e in enumerate(entries):
        s = e.h.shape[0]
        h[i, :s] = torch.from_numpy(e.h)
        mask[i, P - e.p0:P + s] = 1          # past left-padded, new positions right-padded
        pos[i] = e.p0 + torch.arange(S)
        keys[:, i, :, P - e.p0:] = torch.from_numpy(e.k)
        vals[:, i, :, P - e.p0:] = torch.from_numpy(e.v)
    device = model_device(model)
    h, mask, pos, keys, vals = (t.to(device) for t in (h, mask, pos, keys, vals))
    past = DynamicCache(config=cfg)
    unused = torch.zeros(1, n_kv, P, hd, device=device).expand(B, -1, -1, -1)  # blocks below: never read
    for L in range(cfg.num_hidden_layers):
        a = L - first_layer
        past.update(keys[a] if a >= 0 else unused, vals[a] if a >= 0 else unused, L)
    layers = decoder_layers(model)
    below = [layers[L] for L in range(first_layer)]
    for L in range(first_layer):
        layers[L] = _Passthrough()
    try:
        out = model.model(inputs_embeds=h, attention_mask=mask, position_ids=pos, past_key_values=past,
                          use_cache=True)
    finally:
        for L, m in enumerate(below):
            layers[L] = m
    return out.last_hidden_state
