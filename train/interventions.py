"""Trainable interventions of any trainable type, and the hooks that apply them to a torch model.

A type's math comes from its entry in ``edge_reft.interventions`` (``compile`` on
torch tensors, so gradients flow through the same rule the runtimes apply).
R is kept orthonormal by a map, not by a constraint: R = qr(A^T)^T with the
signs fixed (``loreft_torch.orthonormal_rows``), O(d r^2) a step, against the
O(d^2 r) of the d x d Householder parametrization pyreft uses.  Both reach
every orthonormal R; they differ only in the path the optimizer takes.  At
export R is re-orthonormalized in float64, so it is orthonormal to float32
precision; the unconstrained types (noreft, nodireft) train P as it is.
Training starts from the identity edit (the type's ``train_init``: W = R or
W = 0, and b = 0): step 0 is the unpatched model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from edge_reft import interventions as types
from edge_reft import spec
from edge_reft.errors import ReftError
from edge_reft.loreft import random_orthonormal
from .loreft_torch import edit, orthonormal_rows
from edge_reft.patch import BaseModel, Intervention, Patch
from edge_reft.positions import PositionRule


@dataclass(frozen=True)
class Spec:
    layer: int
    rule: PositionRule
    rank: int
    type: str = "loreft"

    def __post_init__(self) -> None:
        trainable_type(self.type)


def trainable_type(name: Any) -> types.InterventionType:
    """The type ``name``, or a ReftError saying why ``edge-reft train --type`` cannot make it."""
    itype = types.get(name)
    if itype is None:
        raise ReftError(f"--type {name!r}: not an intervention type (trainable: {', '.join(types.TRAINABLE)})")
    if not itype.trainable:
        raise ReftError(f"--type {name}: {itype.train_init}")
    return itype


class TrainableReft(torch.nn.Module):
    """Per spec: A (R's unconstrained source, or P), W (types that store a weight) and b."""

    def __init__(self, specs: Sequence[Spec], n_embd: int, seed: int):
        super().__init__()
        self.specs = tuple(specs)
        self.types = tuple(types.TYPES[s.type] for s in self.specs)
        rng = np.random.default_rng(seed)
        self.A = torch.nn.ParameterList()
        self.W = torch.nn.ParameterList()
        self.b = torch.nn.ParameterList()
        self.w_index: list[int | None] = []  # spec k -> its index in W (None: the type has no W)
        for s, t in zip(self.specs, self.types):
            r0 = torch.from_numpy(random_orthonormal(s.rank, n_embd, rng))
            self.A.append(torch.nn.Parameter(r0.clone()))
            self.w_index.append(len(self.W) if spec.WEIGHT in t.stored else None)
            if self.w_index[-1] is not None:
                self.W.append(torch.nn.Parameter(r0.clone() if t.train_init == "w=r" else torch.zeros_like(r0)))
            self.b.append(torch.nn.Parameter(torch.zeros(s.rank)))

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({s.layer for s in self.specs}))

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def first_edited(self, n_prompt: int) -> int:
        """The lowest position any intervention edits in a prompt of n tokens."""
        return min(s.rule.first_edited(n_prompt) for s in self.specs)

    def tensors(self, k: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Spec k's (rotate, weight, bias) as the type stores them (rotate orthonormal where required)."""
        a = self.A[k]
        rotate = orthonormal_rows(a) if self.types[k].orthonormal else a
        w = self.w_index[k]
        return rotate, None if w is None else self.W[w], self.b[k]

    def to_patch(self, base: BaseModel, name: str = "", description: str = "",
                 provenance: Mapping[str, Any] | None = None) -> Patch:
        ivs = []
        with torch.no_grad():
            f32 = (lambda x: None if x is None else x.detach().cpu().float().numpy())  # noqa: E731
            for k, (s, t) in enumerate(zip(self.specs, self.types)):
                a, w = self.A[k], self.w_index[k]
                # R re-orthonormalized in float64 on the CPU: MPS has no float64, and the export is once
                rotate = orthonormal_rows(a.detach().cpu().double()) if t.orthonormal else a
                ivs.append(Intervention(s.layer, s.rule, f32(rotate), f32(None if w is None else self.W[w]),
                                        f32(self.b[k]), s.type))
        return Patch(base, tuple(ivs), name, description, dict(provenance or {}))


class BatchHooks:
    """Forward hooks that edit block outputs of a batch whose rows belong to one or more
    trainable sets (one user, or a fleet of users training together).

    A member is ``(reft, rows, masks)``: the batch rows ``rows`` (a slice; members cover the
    batch in order) are edited with ``reft``'s own parameters where ``masks[k]`` (rows, S)
    is true for its spec k; interventions on one block apply in order.
    """

    Member = tuple[TrainableReft, slice, Sequence[torch.Tensor]]

    def __init__(self, model: Any, members: Sequence[Member]):
        from .hf import decoder_layers
        self.members = list(members)
        self.layers = decoder_layers(model)
        self.handles: list[Any] = []

    def __enter__(self) -> "BatchHooks":
        for layer in sorted({L for reft, _, _ in self.members for L in reft.layers}):
            self.handles.append(self.layers[layer].register_forward_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _hook(self, layer: int):
        at = [[k for k, s in enumerate(reft.specs) if s.layer == layer] for reft, _, _ in self.members]
        if len(self.members) == 1:  # one user: its own edit on the whole batch
            (reft, _, masks), ks = self.members[0], at[0]

            def alone(module: Any, args: Any, output: Any) -> Any:
                h = output[0] if isinstance(output, tuple) else output
                for k in ks:
                    h = torch.where(masks[k][..., None], edit(h, *reft.types[k].compile(*reft.tensors(k))), h)
                return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h
            return alone
        owner = torch.cat([torch.full((rows.stop - rows.start,), i, dtype=torch.long)
                           for i, (_, rows, _) in enumerate(self.members)])

        def fleet(module: Any, args: Any, output: Any) -> Any:
            h = output[0] if isinstance(output, tuple) else output
            for slot in range(max(map(len, at))):  # each member's slot-th intervention on this block
                h = _edit_rows(h, [(reft, ks[slot], masks[ks[slot]]) if slot < len(ks) else None
                                   for (reft, _, masks), ks in zip(self.members, at)], owner.to(h.device))
            return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h
        return fleet


def _edit_rows(h: torch.Tensor, edits: Sequence[tuple[TrainableReft, int, torch.Tensor] | None],
               owner: torch.Tensor) -> torch.Tensor:
    """Rows of ``h`` edited each by its owner's intervention, in one batched product: member i's
    (A, B, c), zero-padded to the largest rank (the padding adds exact zeros), gathered per row;
    a member's mask says where its edit applies (a member without one: nowhere)."""
    rank = max(reft.specs[k].rank for e in edits if e for reft, k, _ in [e])
    d, width = h.shape[-1], h.shape[1]
    A, B, c, where = [], [], [], []
    for i, e in enumerate(edits):
        n = int((owner == i).sum())
        if e is None:
            A.append(h.new_zeros(rank, d, dtype=torch.float32))
            B.append(A[-1])
            c.append(h.new_zeros(rank, dtype=torch.float32))
            where.append(torch.zeros(n, width, dtype=torch.bool, device=h.device))
            continue
        reft, k, mask = e
        a, b, bias = reft.types[k].compile(*reft.tensors(k))
        pad = rank - a.shape[0]
        A.append(torch.nn.functional.pad(a.float(), (0, 0, 0, pad)))
        B.append(torch.nn.functional.pad(b.float(), (0, 0, 0, pad)))
        c.append(torch.nn.functional.pad(bias.float(), (0, pad)))
        where.append(mask)
    A, B, c = torch.stack(A)[owner], torch.stack(B)[owner], torch.stack(c)[owner]
    h32 = h.float()
    u = torch.bmm(h32, B.transpose(1, 2)) + c[:, None, :]
    return torch.where(torch.cat(where)[..., None], h32 + torch.bmm(u, A), h)
