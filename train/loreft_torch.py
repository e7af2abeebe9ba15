"""The reference math in torch (training): the same formula and order as ``loreft``.

Imported only by training, conversion and tests; never by the runtime.
"""
from __future__ import annotations

import torch


def edit(h: torch.Tensor, rotate: torch.Tensor, delta: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``h + (h @ delta.T + bias) @ rotate`` in float32, for rows h of (..., d): A = rotate, B = delta."""
    h32 = h.float()
    return h32 + (h32 @ delta.T + bias) @ rotate


def apply(type: str, h: torch.Tensor, rotate: torch.Tensor, weight: torch.Tensor | None,
          bias: torch.Tensor) -> torch.Tensor:
    """An intervention of ``type`` (edge_reft.interventions) applied to rows h, in float32."""
    from edge_reft.interventions import TYPES
    f32 = (lambda a: None if a is None else a.float())  # noqa: E731
    return edit(h, *TYPES[type].compile(f32(rotate), f32(weight), f32(bias)))


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
