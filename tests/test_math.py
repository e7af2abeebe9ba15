"""The reference math: numpy and torch agree with each other and the closed form."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_reft import loreft, spec
from edge_reft.interventions import TYPES
from edge_reft.train import loreft_torch


def _case(rank: int, d: int, n: int, seed: int):
    rng = np.random.default_rng(seed)
    r = loreft.random_orthonormal(rank, d, rng)
    w = rng.standard_normal((rank, d)).astype(np.float32)
    b = rng.standard_normal(rank).astype(np.float32)
    h = (3 * rng.standard_normal((n, d))).astype(np.float32)
    return h, r, w, b


# pyreft's forward of each class, written out in float64 from pyreft/interventions.py (identity
# act_fn, no dropout): independent of edge_reft.interventions, which must agree with it
CLOSED = {
    "loreft": lambda x, r, w, b: x + r.T @ (w @ x + b - r @ x),
    "noreft": lambda x, r, w, b: x + r.T @ (w @ x + b - r @ x),
    "consreft": lambda x, r, w, b: x + r.T @ (b - r @ x),
    "lobireft": lambda x, r, w, b: x + r.T @ b,
    "direft": lambda x, r, w, b: x + r.T @ (w @ x + b),
    "nodireft": lambda x, r, w, b: x + r.T @ (w @ x + b),
}


def test_every_type_has_a_closed_form_here():
    assert set(CLOSED) == set(TYPES)


def _args(t: str, r, w, b):
    return r, (w if spec.WEIGHT in TYPES[t].stored else None), b


@pytest.mark.parametrize("t", sorted(CLOSED))
@pytest.mark.parametrize("rank,d,n", [(1, 8, 1), (4, 576, 7), (8, 640, 33), (16, 64, 2)])
def test_numpy_matches_closed_form(t, rank, d, n):
    h, r, w, b = _case(rank, d, n, rank)
    if not TYPES[t].orthonormal:  # P unconstrained
        r = r + 0.3 * np.random.default_rng(1).standard_normal(r.shape).astype(np.float32)
    f64 = lambda a: a.astype(np.float64)  # noqa: E731
    closed = np.stack([CLOSED[t](x, f64(r), f64(w), f64(b)) for x in f64(h)])
    got = loreft.apply(t, h, *_args(t, r, w, b))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, closed, rtol=0, atol=1e-4 * np.abs(closed).max())


@pytest.mark.parametrize("t", sorted(CLOSED))
@pytest.mark.parametrize("rank,d,n", [(1, 8, 1), (4, 576, 7), (8, 640, 33)])
def test_torch_matches_numpy(t, rank, d, n):
    h, r, w, b = _case(rank, d, n, 10 + rank)
    want = loreft.apply(t, h, *_args(t, r, w, b))
    tt = lambda a: None if a is None else torch.from_numpy(a)  # noqa: E731
    got = loreft_torch.apply(t, torch.from_numpy(h), *(tt(a) for a in _args(t, r, w, b))).numpy()
    # float32 sums over d terms in BLAS-dependent order (blocking varies with threads and load):
    # a bound scaled to the values, as for the closed form above, not a fixed 1e-5
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("t", sorted(t for t in TYPES if TYPES[t].trainable))
def test_training_starts_from_the_identity(t):
    """Each trainable type's train_init is an edit that changes nothing, exactly."""
    h, r, _, _ = _case(4, 576, 5, 3)
    w = {"w=r": r, "w=0": np.zeros_like(r), "b=0": None}[TYPES[t].train_init]
    np.testing.assert_array_equal(loreft.apply(t, h, r, w, np.zeros(4, np.float32)), h)


def test_edit_only_moves_h_inside_the_row_space():
    h, r, w, b = _case(4, 64, 6, 4)
    moved = loreft.apply("loreft", h, r, w, b) - h
    outside = moved - moved @ r.T @ r
    assert np.abs(outside).max() < 1e-4
    # and inside it, R h' = W h + b (the learned projection is installed)
    np.testing.assert_allclose(loreft.apply("loreft", h, r, w, b) @ r.T, h @ w.T + b, atol=1e-4)


@pytest.mark.parametrize("rank,d", [(1, 16), (4, 576), (12, 64)])
def test_orthonormal_map(rank, d):
    a = torch.randn(rank, d, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    q = loreft_torch.orthonormal_rows(a)
    assert torch.allclose(q @ q.T, torch.eye(rank, dtype=torch.float64), atol=1e-12)
    # already-orthonormal rows are a fixed point
    assert torch.allclose(loreft_torch.orthonormal_rows(q), q, atol=1e-12)
    a.requires_grad_(True)
    loreft_torch.orthonormal_rows(a).sum().backward()
    assert torch.isfinite(a.grad).all()
