"""GGUF's own quantized blocks as torch modules: train on exactly the weights users run.

A ``GGUFLinear`` keeps a linear layer's raw GGUF blocks (4-5 bits a weight
for Q4/Q5 types) and dequantizes them when it computes, bit-exactly as
gguf-py (and so llama.cpp) does.  Dequantized matrices go into a shared,
byte-bounded cache (``DequantCache``), so the layers every step needs are
not dequantized every step; past the budget a layer is dequantized on the
fly, a slice of rows at a time, in the forward and again in the backward, so
memory stays 4-bit plus one slice.
Weights never receive gradients: a patch trains only its own tensors.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import kquants

# GGML type ids (gguf.GGMLQuantizationType) with a torch dequantizer here (and the
# K-quants in kquants.py); any other type falls back to gguf-py's numpy code (exact, slower).
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, BF16 = 0, 1, 2, 3, 6, 7, 8, 30
BLOCK = {Q4_0: (32, 18), Q4_1: (32, 20), Q5_0: (32, 22), Q5_1: (32, 24), Q8_0: (32, 34)}


def _f16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """16 bytes -> 32 values: the low nibbles, then the high nibbles (ggml's order)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1).to(torch.int32)


def _high_bits(qh: torch.Tensor) -> torch.Tensor:
    """4 bytes of 5th bits -> (n, 32) 0/1, bit i for value i."""
    bits = qh.contiguous().view(torch.int32)
    return ((bits >> torch.arange(32, dtype=torch.int32, device=qh.device)) & 1)


def dequantize(raw: torch.Tensor, qtype: int, shape: tuple[int, int]) -> torch.Tensor:
    """Raw GGUF data (uint8 rows, or float rows) of a 2-D tensor -> float32 (rows, cols)."""
    rows, cols = shape
    if qtype == F32:
        return raw.view(torch.float32).reshape(rows, cols)
    if qtype == F16:
        return raw.view(torch.float16).float().reshape(rows, cols)
    if qtype == BF16:
        return (raw.view(torch.int16).to(torch.int32) << 16).view(torch.float32).reshape(rows, cols)
    if qtype in kquants.KQUANTS:
        return kquants.dequantize(raw, qtype).reshape(rows, cols)
    if qtype not in BLOCK:
        import gguf
        dense = gguf.quants.dequantize(raw.cpu().numpy(), gguf.GGMLQuantizationType(qtype))
        return torch.from_numpy(dense.astype(np.float32, copy=False)).to(raw.device).reshape(rows, cols)
    size, nbytes = BLOCK[qtype]
    b = raw.reshape(-1, nbytes)
    if qtype == Q8_0:
        q = b[:, 2:].contiguous().view(torch.int8).float()
        out = _f16(b[:, :2]) * q
    elif qtype == Q4_0:
        out = _f16(b[:, :2]) * (_nibbles(b[:, 2:]) - 8).float()
    elif qtype == Q4_1:
        out = _f16(b[:, :2]) * _nibbles(b[:, 4:]).float() + _f16(b[:, 2:4])
    elif qtype == Q5_0:
        q = _nibbles(b[:, 6:]) | (_high_bits(b[:, 2:6]) << 4)
        out = _f16(b[:, :2]) * (q - 16).float()
    else:  # Q5_1
        q = _nibbles(b[:, 8:]) | (_high_bits(b[:, 4:8]) << 4)
        out = _f16(b[:, :2]) * q.float() + _f16(b[:, 2:4])
    return out.reshape(rows, cols)


class DequantCache:
    """Dequantized matrices kept within ``budget`` bytes, first come first kept.

    Training touches the same layers in the same order every step, so an LRU
    would evict everything once the working set outgrows the budget; keeping
    the first ones and dequantizing the rest on the fly is the best this can do.
    """

    def __init__(self, budget: int):
        self.budget, self.used = budget, 0
        self.items: dict[int, torch.Tensor] = {}
        self.refused: set[int] = set()

    def reset(self) -> None:
        """Forget every matrix (and every refusal): the next ones looked up are kept."""
        self.items.clear()
        self.refused.clear()
        self.used = 0

    def lookup(self, owner: "GGUFLinear") -> torch.Tensor | None:
        key = id(owner)
        w = self.items.get(key)
        if w is not None or key in self.refused:
            return w
        size = owner.out_features * owner.in_features * 4
        if self.used + size > self.budget:
            self.refused.add(key)
            return None
        w = self.items[key] = owner.dequantize()
        self.used += size
        return w


CHUNK_BYTES = 32 << 20  # float32 bytes of one slice of rows dequantized at a time


class _OnTheFly(torch.autograd.Function):
    """y = x W^T + b with W dequantized a slice of rows at a time, in the forward and again in
    the backward: neither the whole float32 matrix (a 128k-vocabulary head is 1 GB) nor any
    slice of it is ever kept.  The bias (frozen) goes into each slice's GEMM, as
    ``F.linear`` adds it (a separate add rounds differently)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, owner: "GGUFLinear") -> torch.Tensor:
        ctx.owner = owner
        outs, start, b = [], 0, owner.bias
        for w in owner.slices():
            outs.append(F.linear(x, w, None if b is None else b[start:start + w.shape[0]]))
            start += w.shape[0]
        return torch.cat(outs, dim=-1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        out, start = None, 0
        for w in ctx.owner.slices():
            part = grad[..., start:start + w.shape[0]] @ w
            out = part if out is None else out.add_(part)
            start += w.shape[0]
        return out, None


class GGUFLinear(torch.nn.Module):
    """A linear layer over raw GGUF blocks (no trainable weight; a frozen float bias, if any)."""

    def __init__(self, raw: torch.Tensor, qtype: int, out_features: int, in_features: int,
                 cache: DequantCache | None, bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("raw", raw, persistent=False)
        self.qtype, self.out_features, self.in_features = qtype, out_features, in_features
        self.cache = cache
        self.register_parameter("bias", None if bias is None else torch.nn.Parameter(bias, requires_grad=False))

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.raw, self.qtype, (self.out_features, self.in_features))

    def slices(self):
        """The float32 matrix, ``CHUNK_BYTES`` of rows at a time (a GGUF row is whole blocks)."""
        step = max(1, CHUNK_BYTES // (4 * self.in_features))
        for a in range(0, self.out_features, step):
            b = min(a + step, self.out_features)
            yield dequantize(self.raw[a:b], self.qtype, (b - a, self.in_features))

    @property
    def weight(self) -> torch.Tensor:  # for code that reads .weight (e.g. tied heads)
        w = self.cache.lookup(self) if self.cache is not None else None
        return w if w is not None else self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.cache.lookup(self) if self.cache is not None else None
        # F.linear: bit for bit what transformers' nn.Linear computes (its bias inside the GEMM)
        return F.linear(x, w, self.bias) if w is not None else _OnTheFly.apply(x, self)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, ggml_type={self.qtype}"


class GGUFEmbedding(torch.nn.Module):
    """Token embeddings over raw GGUF rows: only the rows looked up are dequantized."""

    def __init__(self, raw: torch.Tensor, qtype: int, n_vocab: int, dim: int, scale: float = 1.0):
        super().__init__()
        self.register_buffer("raw", raw, persistent=False)
        self.qtype, self.n_vocab, self.dim, self.scale = qtype, n_vocab, dim, scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = dequantize(self.raw[flat].reshape(-1), self.qtype, (flat.numel(), self.dim))
        out = rows.reshape(*ids.shape, self.dim)
        return out * self.scale if self.scale != 1.0 else out
