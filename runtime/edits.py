"""Patches compiled for a runtime: which rows of which layer to edit, and the edit.

Shared by every backend.  A ``PatchSet`` flattens one or more patches into
interventions in file order (patch order, then file order within a patch),
compiles each to the (A, B, c) of h + A^T (B h + c) once (its type's rule,
``edge_reft.interventions``), and answers, for a chunk of token positions,
which positions each layer must edit.  The math itself is
``edge_reft.loreft.edit``; backends never re-derive it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from edge_reft.loreft import edit
from edge_reft.patch import BaseModel, Patch
from edge_reft.positions import PositionRule, edit_signature


@dataclass(frozen=True, eq=False)
class CompiledIntervention:
    index: int               # order of application within the set
    layer: int
    rule: PositionRule
    rotate: np.ndarray       # (r, d) float32: A
    delta: np.ndarray        # (r, d) float32: B (W - R for LoReFT)
    bias: np.ndarray         # (r,) float32: c

    def apply(self, h: np.ndarray) -> np.ndarray:
        return edit(h, self.rotate, self.delta, self.bias)


class PatchSet:
    """One or more patches, ready to apply; immutable and shareable between threads."""

    def __init__(self, patches: Sequence[Patch], model: BaseModel | None = None,
                 allow_mismatch: bool = False):
        self.patches = tuple(patches)
        if model is not None:
            for p in self.patches:
                p.check_base(model, allow_mismatch)
        ivs = [iv for p in self.patches for iv in p.interventions]
        self.interventions = tuple(CompiledIntervention(i, iv.layer, iv.positions, *iv.compiled())
                                   for i, iv in enumerate(ivs))
        self.layers = tuple(sorted({c.layer for c in self.interventions}))
        self.by_layer = {L: tuple(c for c in self.interventions if c.layer == L) for L in self.layers}
        self.rules = tuple(c.rule for c in self.interventions)
        self.edits_generated = any(r.all for r in self.rules)
        h = hashlib.sha256()
        for c in self.interventions:
            h.update(f"{c.layer}|{c.rule}|{c.rotate.shape}|".encode())
            for a in (c.rotate, c.delta, c.bias):
                h.update(a.tobytes())
        self.key = h.hexdigest() if self.interventions else ""
        # the arrays this set keeps alive (compiled edits and the patches' own tensors, each once)
        held = {id(a): a for c in self.interventions for a in (c.rotate, c.delta, c.bias)}
        held.update((id(a), a) for iv in ivs for a in iv.arrays.values())
        self.nbytes = sum(a.nbytes for a in held.values())

    def __bool__(self) -> bool:
        return bool(self.interventions)

    def signature(self, n_prompt: int, n_total: int) -> np.ndarray:
        return edit_signature(self.rules, n_prompt, n_total)

    def chunk_edits(self, start: int, n: int, n_prompt: int) -> dict[int, list[tuple[CompiledIntervention, np.ndarray]]]:
        """For positions [start, start+n): per layer, each intervention with the
        chunk-relative indices it edits (only layers with something to edit)."""
        out: dict[int, list[tuple[CompiledIntervention, np.ndarray]]] = {}
        stop = start + n
        for c in self.interventions:
            if c.rule.all:
                idx = np.arange(n)
            elif start >= n_prompt:
                continue
            else:
                sel = c.rule.select(n_prompt)
                idx = sel[(sel >= start) & (sel < stop)] - start
            if idx.size:
                out.setdefault(c.layer, []).append((c, idx))
        return out

    def masks(self, start: int, n: int, n_prompt: int) -> np.ndarray:
        """(n_interventions, n) float32 0/1: which chunk positions each intervention edits."""
        m = np.zeros((len(self.interventions), n), dtype=np.float32)
        for layer_edits in self.chunk_edits(start, n, n_prompt).values():
            for c, idx in layer_edits:
                m[c.index, idx] = 1.0
        return m


EMPTY = PatchSet(())


def apply_rows(h: np.ndarray, edits: Sequence[tuple[CompiledIntervention, np.ndarray]]) -> None:
    """Apply a layer's edits in order to rows of ``h`` (in place); rows are chunk-relative."""
    for c, rows in edits:
        h[rows] = c.apply(h[rows])
