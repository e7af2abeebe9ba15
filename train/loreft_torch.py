"""The reference math in torch (training): the same formula and order as ``loreft``.

Imported only by training, conversion and tests; never by the runtime.
"""
from __future__ import annotations

import torch


def edit(h: torch.Tensor, rotate: torch.Tensor, delta: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``h + (h @ delta.T + bias) @ rotate`` in float32, for rows h of (..., d); delta = W - R."""
    h32 = h.float()
    return h32 + (h32 @ delta.T + bias) @ rotate


def loreft(h: torch.Tensor, rotate: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """h + R^T (W h + b - R h), row-wise, in float32."""
    r = rotate.float()
    return edit(h, r, weight.float() - r, bias.float())


def orthonormal_rows(a: torch.Tensor) -> torch.Tensor:
    """Map an unconstrained (r, d) matrix to one with orthonormal rows (differentiably).

    A thin QR of a^T costs O(d r^2), against the O(d^2 r) of torch's
    orthogonal parametrization (householder product applied to a d x d
    base) that pyreft uses.  Signs are fixed so that the map is smooth and
    the identity on matrices whose rows are already orthonormal.
    """
    q, r = torch.linalg.qr(a.T)
    d = torch.diagonal(r)
    sign = torch.where(d < 0, -torch.ones_like(d), torch.ones_like(d))
    return (q * sign).T
