"""Intervention types: one entry each, and the one place their math is derived.

Every type pyreft ships is, with its default identity activation, an edit of
one shape at the selected rows h of a block's output:

    h <- h + A^T (B h + c)

which every backend computes as ``h + (h @ B.T + c) @ A`` in float32: numpy
(``loreft.edit``), torch (``train/loreft_torch.edit``), the C gate
(``runtime/llamacpp/gate.c``) and the ONNX graph (``converters/onnx_export``).
A type says which tensors a patch stores for it (``stored``: R or P as
``rotate``, W as ``weight``, b as ``bias``), whether ``rotate`` must have
orthonormal rows, and how (A, B, c) follow from the stored tensors
(``compile``).  ``compile`` is written with operators only, so the same entry
serves numpy arrays (runtimes, reference) and torch tensors (training, with
gradients).  Adding a type is one entry here plus its tests.

pyreft's classes, their forward, and what a patch stores:

| type     | pyreft class         | edit                  | A  | B      | c | stores             |
|----------|----------------------|-----------------------|----|--------|---|--------------------|
| loreft   | LoreftIntervention   | h + R^T(Wh + b - Rh)  | R  | W - R  | b | rotate weight bias |
| noreft   | NoreftIntervention   | h + P^T(Wh + b - Ph)  | P  | W - P  | b | rotate weight bias |
| consreft | ConsreftIntervention | h + R^T(b - Rh)       | R  | -R     | b | rotate bias        |
| lobireft | LobireftIntervention | h + R^T b             | R  | 0      | b | rotate bias        |
| direft   | DireftIntervention   | h + R^T(Wh + b)       | R  | W      | b | rotate weight bias |
| nodireft | NodireftIntervention | h + P^T(Wh + b)       | P  | W      | b | rotate weight bias |

R has orthonormal rows (pyreft parametrizes it with torch's orthogonal map,
DiReFT included); P is unconstrained.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from . import spec

ROLES = (spec.ROTATE, spec.WEIGHT, spec.BIAS)


@dataclass(frozen=True)
class InterventionType:
    name: str                  # reft.{i}.type
    pyreft: str                # pyreft's class (pyreft.interventions.<pyreft>)
    formula: str               # the edit, in pyreft's notation
    stored: tuple[str, ...]    # the tensors a patch holds for it, in ROLES order
    orthonormal: bool          # rotate's rows must be orthonormal (spec.orthonormal_tolerance)
    version: int               # the first format version that has it
    _b: Callable[[Any, Any], Any]   # B from (rotate, weight); weight is None when not stored
    # how `edge-reft train --type` starts it from the identity edit (step 0 is the unpatched
    # model): "w=r" (W = R, b = 0), "w=0" (W = 0, b = 0), "b=0"; else why it cannot be trained
    train_init: str = ""

    @property
    def trainable(self) -> bool:
        return self.train_init in ("w=r", "w=0", "b=0")

    def compile(self, rotate: Any, weight: Any, bias: Any) -> tuple[Any, Any, Any]:
        """(A, B, c) of the edit h + A^T (B h + c), for numpy arrays or torch tensors."""
        return rotate, self._b(rotate, weight), bias


def _zeros_like(rotate: Any, weight: Any) -> Any:
    return rotate * 0  # numpy and torch alike; keeps a torch graph intact


TYPES: dict[str, InterventionType] = {t.name: t for t in (
    InterventionType("loreft", "LoreftIntervention", "h + R^T(W h + b - R h)", ROLES, True, 1,
                     lambda r, w: w - r, "w=r"),
    InterventionType("noreft", "NoreftIntervention", "h + P^T(W h + b - P h)", ROLES, False, 1,
                     lambda r, w: w - r, "w=r"),
    InterventionType("consreft", "ConsreftIntervention", "h + R^T(b - R h)", (spec.ROTATE, spec.BIAS),
                     True, 2, lambda r, w: -r,
                     "not trainable here: it has no identity start (b - R h is never 0 for all h), "
                     "so step 0 would already replace R's subspace of every edited row"),
    InterventionType("lobireft", "LobireftIntervention", "h + R^T b", (spec.ROTATE, spec.BIAS), True, 2,
                     _zeros_like, "b=0"),
    InterventionType("direft", "DireftIntervention", "h + R^T(W h + b)", ROLES, True, 2,
                     lambda r, w: w, "w=0"),
    InterventionType("nodireft", "NodireftIntervention", "h + P^T(W h + b)", ROLES, False, 2,
                     lambda r, w: w, "w=0"),
)}
TRAINABLE = tuple(n for n, t in TYPES.items() if t.trainable)
BY_PYREFT = {t.pyreft: t for t in TYPES.values()}


def get(name: Any) -> InterventionType | None:
    return TYPES.get(name) if isinstance(name, str) else None
