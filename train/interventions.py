"""Trainable LoReFT interventions, and the hooks that apply them to a torch model.

R is kept orthonormal by a map, not by a constraint: R = qr(A^T)^T with the
signs fixed (``loreft_torch.orthonormal_rows``), O(d r^2) a step, against the
O(d^2 r) of the d x d Householder parametrization pyreft uses.  Both reach
every orthonormal R; they differ only in the path the optimizer takes.  At
export R is re-orthonormalized in float64, so it is orthonormal to float32
precision.  Training starts from the identity edit (W = R, b = 0): step 0 is
the unpatched model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from edge_reft.loreft import random_orthonormal
from .loreft_torch import edit, orthonormal_rows
from edge_reft.patch import BaseModel, Intervention, Patch
from edge_reft.positions import PositionRule


@dataclass(frozen=True)
class Spec:
    layer: int
    rule: PositionRule
    rank: int


class TrainableReft(torch.nn.Module):
    def __init__(self, specs: Sequence[Spec], n_embd: int, seed: int):
        super().__init__()
        self.specs = tuple(specs)
        rng = np.random.default_rng(seed)
        self.A = torch.nn.ParameterList()
        self.W = torch.nn.ParameterList()
        self.b = torch.nn.ParameterList()
        for s in self.specs:
            r0 = torch.from_numpy(random_orthonormal(s.rank, n_embd, rng))
            self.A.append(torch.nn.Parameter(r0.clone()))
            self.W.append(torch.nn.Parameter(r0.clone()))
            self.b.append(torch.nn.Parameter(torch.zeros(s.rank)))

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({s.layer for s in self.specs}))

    def n_params(self) -> int:
        return sum(s.rank * (2 * self.A[0].shape[1] + 1) for s in self.specs)

    def first_edited(self, n_prompt: int) -> int:
        """The lowest position any intervention edits in a prompt of n tokens."""
        return min(s.rule.first_edited(n_prompt) for s in self.specs)

    def to_patch(self, base: BaseModel, name: str = "", description: str = "",
                 provenance: Mapping[str, Any] | None = None) -> Patch:
        ivs = []
        with torch.no_grad():
            for s, a, w, b in zip(self.specs, self.A, self.W, self.b):
                # float64 on the CPU: MPS has no float64, and the export is once
                r = orthonormal_rows(a.detach().cpu().double()).float()
                ivs.append(Intervention(s.layer, s.rule, r.numpy(), w.detach().cpu().float().numpy(),
                                        b.detach().cpu().float().numpy()))
        return Patch(base, tuple(ivs), name, description, dict(provenance or {}))


class BatchHooks:
    """Forward hooks that edit block outputs where ``masks[k]`` (B, S) is true.

    Set ``masks`` (one bool tensor per spec, for the positions of the next
    forward) before each forward; interventions on one block apply in order.
    """

    def __init__(self, model: Any, reft: TrainableReft):
        from .hf import decoder_layers
        self.reft, self.masks = reft, None
        self.layers = decoder_layers(model)
        self.handles: list[Any] = []

    def __enter__(self) -> "BatchHooks":
        for layer in self.reft.layers:
            ks = [k for k, s in enumerate(self.reft.specs) if s.layer == layer]
            self.handles.append(self.layers[layer].register_forward_hook(self._hook(ks)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _hook(self, ks: list[int]):
        def hook(module: Any, args: Any, output: Any) -> Any:
            h = output[0] if isinstance(output, tuple) else output
            for k in ks:
                r = orthonormal_rows(self.reft.A[k])
                edited = edit(h, r, self.reft.W[k] - r, self.reft.b[k])
                h = torch.where(self.masks[k][..., None], edited, h)
            return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h
        return hook
