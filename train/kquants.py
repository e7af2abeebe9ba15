"""K-quant blocks (Q2_K..Q6_K) dequantized in torch, bit-exactly as gguf-py does it.

These are the types users actually download (Q4_K_M mixes Q4_K and Q6_K), so
training must not fall back to gguf-py's numpy code for them on every use.
Each function mirrors ``gguf.quants.<TYPE>.dequantize_blocks`` step by step
(float16 super-block scale widened to float32, times the sub-block scale,
times the quant, minus the scaled min).  Bit-exactness does not hang on that
order: an f16 mantissa (11 bits) times a sub-block scale (at most 7
significant bits) times a quant (at most 6) fits float32's 24, so every
product is exact and the one rounding is the final subtraction of the min,
which an FMA (torch.compile, GPU) rounds the same way.  It does hang on the
bit unpacking, which the tests check.  In-place float ops: an out-of-place
``a * b - c`` allocates twice and ran about 3x slower here.
Every function takes (n_blocks, type_size) uint8 and returns (n_blocks, 256).
"""
from __future__ import annotations

from typing import Callable

import torch

QK_K = 256
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = 10, 11, 12, 13, 14  # gguf.GGMLQuantizationType


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Two bytes per block -> (n, 1) float32, the exact widening numpy does."""
    return b.contiguous().view(torch.float16).float()


def _shift(x: torch.Tensor, group: int, shifts: list[int], mask: int) -> torch.Tensor:
    """(n, bytes) -> (n, bytes // group * len(shifts), group): each run of ``group`` bytes,
    shifted by every amount in turn (ggml's order), masked.  One scalar shift per amount:
    torch's broadcast shift by a tensor is several times slower."""
    n = x.shape[0]
    x = x.reshape(n, -1, 1, group)
    return torch.cat([(x >> s) & mask for s in shifts], dim=2).reshape(n, -1, group)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 bytes -> 8 six-bit scales and 8 six-bit mins (Q4_K/Q5_K's packing)."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def q2_k(b: torch.Tensor) -> torch.Tensor:
    """scales[16] qs[64] d dmin: 2-bit quants, 16 sub-blocks of 16 with 4-bit scale and min."""
    n = b.shape[0]
    scales, qs, d, dmin = b[:, :16], b[:, 16:80], _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0xF).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    q = _shift(qs, 32, [0, 2, 4, 6], 3).reshape(n, 16, 16)
    return q.float().mul_(dl).sub_(ml).reshape(n, QK_K)


def q3_k(b: torch.Tensor) -> torch.Tensor:
    """hmask[32] qs[64] scales[12] d: 3-bit quants (2 low bits, inverted high bit), 6-bit scales."""
    n = b.shape[0]
    hmask, qs, scales, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    low = _shift(scales[:, :8], 8, [0, 4], 0x0F).reshape(n, 16)
    high = _shift(scales[:, 8:], 4, [0, 2, 4, 6], 0x03).reshape(n, 16)
    sc = ((low | (high << 4)).to(torch.int32) - 32).float()
    dl = (d * sc).reshape(n, 16, 1)
    ql = _shift(qs, 32, [0, 2, 4, 6], 3).reshape(n, 16, 16)
    qh = _shift(hmask, 32, list(range(8)), 1).reshape(n, 16, 16)
    # q = ql - 4 where the hmask bit is clear: (ql | bit << 2) - 4, without a signed pass
    return (ql | (qh << 2)).float().sub_(4).mul_(dl).reshape(n, QK_K)


def q4_k(b: torch.Tensor) -> torch.Tensor:
    """d dmin scales[12] qs[128]: 4-bit quants, 8 sub-blocks of 32 with 6-bit scale and min."""
    n = b.shape[0]
    d, dmin, (sc, mn) = _f16(b[:, 0:2]), _f16(b[:, 2:4]), _scale_min_k4(b[:, 4:16])
    dl = (d * sc.float()).reshape(n, 8, 1)
    dm = (dmin * mn.float()).reshape(n, 8, 1)
    q = _shift(b[:, 16:], 32, [0, 4], 0x0F)
    return q.float().mul_(dl).sub_(dm).reshape(n, QK_K)


def q5_k(b: torch.Tensor) -> torch.Tensor:
    """d dmin scales[12] qh[32] qs[128]: Q4_K plus a fifth bit per quant."""
    n = b.shape[0]
    d, dmin, (sc, mn) = _f16(b[:, 0:2]), _f16(b[:, 2:4]), _scale_min_k4(b[:, 4:16])
    dl = (d * sc.float()).reshape(n, 8, 1)
    dm = (dmin * mn.float()).reshape(n, 8, 1)
    q = _shift(b[:, 48:], 32, [0, 4], 0x0F) | (_shift(b[:, 16:48], 32, list(range(8)), 1) << 4)
    return q.float().mul_(dl).sub_(dm).reshape(n, QK_K)


def q6_k(b: torch.Tensor) -> torch.Tensor:
    """ql[128] qh[64] scales[16] d: 6-bit quants, 16 sub-blocks of 16 with int8 scales."""
    n = b.shape[0]
    ql, qh, d = b[:, :128], b[:, 128:192], _f16(b[:, 208:210])
    sc = b[:, 192:208].contiguous().view(torch.int8).float()
    dl = (d * sc).reshape(n, 16, 1)
    q = _shift(ql, 64, [0, 4], 0x0F).reshape(n, 8, 32) | (_shift(qh, 32, [0, 2, 4, 6], 3) << 4)
    return q.reshape(n, 16, 16).float().sub_(32).mul_(dl).reshape(n, QK_K)


# type id -> (bytes per 256-value block, dequantizer)
KQUANTS: dict[int, tuple[int, Callable[[torch.Tensor], torch.Tensor]]] = {
    Q2_K: (84, q2_k), Q3_K: (110, q3_k), Q4_K: (144, q4_k), Q5_K: (176, q5_k), Q6_K: (210, q6_k),
}


def dequantize(raw: torch.Tensor, qtype: int) -> torch.Tensor:
    """Raw K-quant bytes (any shape, whole blocks) -> flat float32 values."""
    nbytes, fn = KQUANTS[qtype]
    return fn(raw.reshape(-1, nbytes)).reshape(-1)
