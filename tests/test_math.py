"""The reference math: numpy and torch agree with each other and the closed form."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_reft import loreft
from edge_reft.train import loreft_torch


def _case(rank: int, d: int, n: int, seed: int):
    rng = np.random.default_rng(seed)
    r = loreft.random_orthonormal(rank, d, rng)
    w = rng.standard_normal((rank, d)).astype(np.float32)
    b = rng.standard_normal(rank).astype(np.float32)
    h = (3 * rng.standard_normal((n, d))).astype(np.float32)
    return h, r, w, b


@pytest.mark.parametrize("rank,d,n", [(1, 8, 1), (4, 576, 7), (8, 640, 33), (16, 64, 2)])
def test_numpy_matches_closed_form(rank, d, n):
    h, r, w, b = _case(rank, d, n, rank)
    closed = np.stack([x + r.astype(np.float64).T @ (w.astype(np.float64) @ x + b - r.astype(np.float64) @ x)
                       for x in h.astype(np.float64)])
    got = loreft.loreft(h, r, w, b)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, closed, rtol=0, atol=1e-4 * np.abs(closed).max())


@pytest.mark.parametrize("rank,d,n", [(1, 8, 1), (4, 576, 7), (8, 640, 33)])
def test_torch_matches_numpy(rank, d, n):
    h, r, w, b = _case(rank, d, n, 10 + rank)
    want = loreft.loreft(h, r, w, b)
    got = loreft_torch.loreft(torch.from_numpy(h), torch.from_numpy(r), torch.from_numpy(w),
                              torch.from_numpy(b)).numpy()
    # float32 sums over d terms in BLAS-dependent order (blocking varies with threads and load):
    # a bound scaled to the values, as for the closed form above, not a fixed 1e-5
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_identity_patch_is_exact():
    h, r, _, _ = _case(4, 576, 5, 3)
    np.testing.assert_array_equal(loreft.loreft(h, r, r, np.zeros(4, np.float32)), h)


def test_edit_only_moves_h_inside_the_row_space():
    h, r, w, b = _case(4, 64, 6, 4)
    moved = loreft.loreft(h, r, w, b) - h
    outside = moved - moved @ r.T @ r
    assert np.abs(outside).max() < 1e-4
    # and inside it, R h' = W h + b (the learned projection is installed)
    np.testing.assert_allclose(loreft.loreft(h, r, w, b) @ r.T, h @ w.T + b, atol=1e-4)


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
