"""The reference math, in numpy and float32: every backend agrees with this.

LoReFT at one layer, on selected positions:

    h <- h + R^T (W h + b - R h)

computed, for rows h of an (n, d) matrix, as ``h + (h @ (W - R)^T + b) @ R``:
one (n, d) x (d, r) and one (n, r) x (r, d) product, with ``W - R`` formed
once per patch.  The torch twin (``loreft_torch``) and the native gate use
the same order of operations.
"""
from __future__ import annotations

import numpy as np


def delta_weight(rotate: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``W - R`` in float32, the one matrix the edit multiplies h by."""
    return np.ascontiguousarray(weight, dtype=np.float32) - np.ascontiguousarray(rotate, dtype=np.float32)


def edit(h: np.ndarray, rotate: np.ndarray, delta: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Return the edited rows: ``h + (h @ delta.T + bias) @ rotate`` (all float32).

    ``h`` is (n, d); ``rotate`` and ``delta`` (= W - R) are (r, d); ``bias`` is (r,).
    """
    h = np.asarray(h, dtype=np.float32)
    return h + (h @ delta.T + bias) @ rotate


def loreft(h: np.ndarray, rotate: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """The closed form, for readers and tests: h + R^T (W h + b - R h), row-wise."""
    return edit(h, np.asarray(rotate, np.float32), delta_weight(rotate, weight),
                np.asarray(bias, np.float32))


def orthonormality_error(rotate: np.ndarray) -> float:
    """max |R R^T - I| in float64: 0 for rows that are exactly orthonormal."""
    r = np.asarray(rotate, dtype=np.float64)
    return float(np.max(np.abs(r @ r.T - np.eye(r.shape[0])))) if r.size else 0.0


def random_orthonormal(rank: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """An (rank, dim) float32 matrix with orthonormal rows (QR of a Gaussian)."""
    q, r = np.linalg.qr(rng.standard_normal((dim, rank)))
    q = q * np.sign(np.diag(r))  # a unique, well-spread choice
    return np.ascontiguousarray(q.T, dtype=np.float32)
