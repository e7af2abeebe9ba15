"""The reference math, in numpy and float32: every backend agrees with this.

Every intervention type is an edit h <- h + A^T (B h + c) of the selected rows
(``edge_reft.interventions`` derives A, B, c from a type's stored tensors;
for LoReFT, h + R^T (W h + b - R h): A = R, B = W - R, c = b), computed for
rows h of an (n, d) matrix as ``h + (h @ B^T + c) @ A``: one (n, d) x (d, r)
and one (n, r) x (r, d) product, with B formed once per patch.  The torch twin
(``train/loreft_torch``), the native gate and the ONNX graph use the same order
of operations.
"""
from __future__ import annotations

import numpy as np


def edit(h: np.ndarray, rotate: np.ndarray, delta: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Return the edited rows: ``h + (h @ delta.T + bias) @ rotate`` (all float32).

    ``h`` is (n, d); ``rotate`` (A) and ``delta`` (B, e.g. W - R) are (r, d); ``bias`` (c) is (r,).
    """
    h = np.asarray(h, dtype=np.float32)
    return h + (h @ delta.T + bias) @ rotate


def apply(type: str, h: np.ndarray, rotate: np.ndarray, weight: np.ndarray | None,
          bias: np.ndarray) -> np.ndarray:
    """An intervention of ``type`` applied to every row of ``h`` (float32)."""
    from .interventions import TYPES
    f32 = (lambda a: None if a is None else np.asarray(a, np.float32))  # noqa: E731
    return edit(h, *TYPES[type].compile(f32(rotate), f32(weight), f32(bias)))


def orthonormality_error(rotate: np.ndarray) -> float:
    """max |R R^T - I| in float64: 0 for rows that are exactly orthonormal."""
    r = np.asarray(rotate, dtype=np.float64)
    return float(np.max(np.abs(r @ r.T - np.eye(r.shape[0])))) if r.size else 0.0


def random_orthonormal(rank: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """An (rank, dim) float32 matrix with orthonormal rows (QR of a Gaussian)."""
    q, r = np.linalg.qr(rng.standard_normal((dim, rank)))
    q = q * np.sign(np.diag(r))  # a unique, well-spread choice
    return np.ascontiguousarray(q.T, dtype=np.float32)
