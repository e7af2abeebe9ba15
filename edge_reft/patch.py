"""Immutable records of a patch: ``Patch``, ``Intervention``, ``BaseModel``.

A record is validated when it is built, by the same function the file
reader uses, so an invalid patch can be neither loaded nor written.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import numpy as np

from . import interventions as types
from . import spec
from .errors import PatchMismatchError, PositionError, ReftFormatError
from .loreft import orthonormality_error
from .positions import PositionRule


@dataclass(frozen=True)
class BaseModel:
    """What a patch is bound to: a model's shape and the fingerprint of its identity."""
    architecture: str
    n_embd: int
    n_layer: int
    fingerprint: str
    name: str = ""

    def describe(self) -> str:
        name = f"{self.name} " if self.name else ""
        return (f"{name}({self.architecture}, n_embd={self.n_embd}, n_layer={self.n_layer}, "
                f"fingerprint {self.fingerprint[:16]}…)")


def _frozen_f32(a: Any) -> np.ndarray:
    arr = np.array(a, dtype=np.float32, copy=True, order="C")
    arr.setflags(write=False)
    return arr


def intervention_problems(where: str, *, type: str, layer: Any, component: Any, positions: Any,
                          rank: Any, rotate: np.ndarray | None, weight: np.ndarray | None,
                          bias: np.ndarray | None, n_embd: int, n_layer: int,
                          rotate_dtype: int = spec.GGML_F32, version: int = spec.REFT_VERSION) -> list[str]:
    """Every problem of one intervention, each naming its field (the reader's and the builder's
    check); ``version`` is the file's ``reft.version`` (what it may use)."""
    out: list[str] = []
    itype = types.get(type)
    if itype is None:
        out.append(f"{where}.type: {str(type)[:80]!r} is not a known intervention type "
                   f"(expected one of {', '.join(types.TYPES)})")
    elif itype.version > version:
        out.append(f"{where}.type: {type!r} needs reft.version {itype.version}; the file says {version}")
    if not isinstance(layer, int) or not 0 <= layer < n_layer:
        out.append(f"{where}.layer: {layer!r} is outside the base model's blocks 0..{n_layer - 1}")
    if component not in spec.COMPONENTS:
        out.append(f"{where}.component: {component!r} is not supported (expected {spec.COMPONENTS[0]!r})")
    try:
        rule = positions if isinstance(positions, PositionRule) else PositionRule.parse(positions)
        if rule.version > version:
            out.append(f"{where}.positions: {str(rule)!r} needs reft.version {rule.version}; "
                       f"the file says {version}")
    except PositionError as e:
        out.append(f"{where}.positions: {e}")
    if not isinstance(rank, int) or not 1 <= rank <= min(n_embd, spec.MAX_RANK):
        out.append(f"{where}.rank: {rank!r} is not in 1..{min(n_embd, spec.MAX_RANK)}")
        return out  # shapes cannot be checked against a bad rank
    shapes = {spec.ROTATE: (rotate, (rank, n_embd)), spec.WEIGHT: (weight, (rank, n_embd)),
              spec.BIAS: (bias, (rank,))}
    rotate_ok = False
    for role, (arr, want) in shapes.items():
        name = f"{where}.{role}"
        if itype is not None and role not in itype.stored:
            if arr is not None:
                out.append(f"{name}: a {type} intervention stores no {role} ({itype.formula})")
        elif arr is None:
            out.append(f"{name}: tensor missing")
        elif arr.shape != want:
            out.append(f"{name}: shape {tuple(arr.shape)}, expected {want} (rank {rank}, n_embd {n_embd})")
        elif not np.all(np.isfinite(arr)):
            out.append(f"{name}: holds {int(np.sum(~np.isfinite(arr)))} NaN/Inf values")
        elif arr.size and float(np.max(np.abs(arr))) > spec.MAX_ABS_VALUE:
            out.append(f"{name}: holds a value of magnitude {float(np.max(np.abs(arr))):.3g}, more than "
                       f"the limit of {spec.MAX_ABS_VALUE:g} (FORMAT.md, Validation and limits)")
        else:
            rotate_ok = rotate_ok or role == spec.ROTATE
    if rotate_ok and itype is not None and itype.orthonormal:
        err, tol = orthonormality_error(rotate), spec.orthonormal_tolerance(rotate_dtype)
        if not err <= tol:
            out.append(f"{where}.rotate: rows are not orthonormal (max |R R^T - I| = {err:.3g}, "
                       f"tolerance {tol:.3g} for {spec.TENSOR_DTYPES[rotate_dtype]}; "
                       f"type {type} needs R orthonormal)")
    return out


@dataclass(frozen=True, eq=False)
class Intervention:
    """One learned edit at one layer and a set of positions: ``type`` names its math
    (``edge_reft.interventions``); ``weight`` is None for types that store none."""
    layer: int
    positions: PositionRule
    rotate: np.ndarray          # (r, d): R, or P for the unconstrained types
    weight: np.ndarray | None   # (r, d): W
    bias: np.ndarray            # (r,): b
    type: str = "loreft"
    component: str = "block_output"
    dtype: int = spec.GGML_F32  # storage type in a file (computation is always float32)

    def __post_init__(self) -> None:
        if isinstance(self.positions, str):
            object.__setattr__(self, "positions", PositionRule.parse(self.positions))
        for role in types.ROLES:
            if getattr(self, role) is not None:
                object.__setattr__(self, role, _frozen_f32(getattr(self, role)))
        if self.dtype not in spec.TENSOR_DTYPES:
            raise ReftFormatError("<intervention>", f"dtype: {self.dtype} is not one of "
                                  f"{sorted(spec.TENSOR_DTYPES.values())}")

    @property
    def rank(self) -> int:
        return int(self.rotate.shape[0])

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """The stored tensors by role (rotate, weight, bias), without the absent ones."""
        return {r: a for r in types.ROLES if (a := getattr(self, r)) is not None}

    @property
    def n_params(self) -> int:
        return sum(a.size for a in self.arrays.values())

    @property
    def version(self) -> int:
        """The first format version that can hold this intervention."""
        itype = types.get(self.type)
        return max(itype.version if itype else 1, self.positions.version)

    def compiled(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(A, B, c) of h + A^T (B h + c), float32: what every runtime applies."""
        a, b, c = types.TYPES[self.type].compile(self.rotate, self.weight, self.bias)
        return a, np.ascontiguousarray(b, dtype=np.float32), c

    def problems(self, where: str, n_embd: int, n_layer: int) -> list[str]:
        return intervention_problems(
            where, type=self.type, layer=self.layer, component=self.component,
            positions=self.positions, rank=self.rank if self.rotate.ndim == 2 else -1,
            rotate=self.rotate, weight=self.weight, bias=self.bias, n_embd=n_embd,
            n_layer=n_layer, rotate_dtype=self.dtype)


@dataclass(frozen=True, eq=False)
class Patch:
    """A set of interventions, in file order, bound to one base model."""
    base: BaseModel
    interventions: tuple[Intervention, ...]
    name: str = ""
    description: str = ""
    provenance: Mapping[str, Any] = field(default_factory=dict)  # reft.train.* without the prefix
    source: str = "<in-memory patch>"

    def __post_init__(self) -> None:
        object.__setattr__(self, "interventions", tuple(self.interventions))
        object.__setattr__(self, "provenance", MappingProxyType(dict(self.provenance)))
        problems = base_problems(self.base)
        if not 1 <= len(self.interventions) <= spec.MAX_INTERVENTIONS:
            problems.append(f"{spec.COUNT}: {len(self.interventions)} interventions, expected "
                            f"1..{spec.MAX_INTERVENTIONS}")
        for i, iv in enumerate(self.interventions):
            problems += iv.problems(f"reft.{i}", self.base.n_embd, self.base.n_layer)
        for k, v in self.provenance.items():
            if not _provenance_ok(v):
                problems.append(f"{spec.TRAIN_PREFIX}{k}: {type(v).__name__} is not a str, int, "
                                "float, bool or a list of them")
        if problems:
            raise ReftFormatError(self.source, problems)

    @property
    def n_params(self) -> int:
        return sum(iv.n_params for iv in self.interventions)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({iv.layer for iv in self.interventions}))

    @property
    def version(self) -> int:
        """The `reft.version` a file of this patch carries: the lowest that holds it, so a patch
        that uses nothing new stays readable by version-1 readers."""
        return max(iv.version for iv in self.interventions)

    def check_base(self, model: BaseModel, allow_mismatch: bool = False) -> None:
        """Refuse this patch on another model than its own (``allow_mismatch`` overrides)."""
        shape_ok = (model.n_embd == self.base.n_embd
                    and all(iv.layer < model.n_layer for iv in self.interventions))
        if model.fingerprint == self.base.fingerprint and shape_ok:
            return
        what = (f"{self.source}: this patch was made for {self.base.describe()}, "
                f"but the model in hand is {model.describe()}")
        if not shape_ok:
            raise PatchMismatchError(f"{what}; its hidden size or layers do not fit this model, "
                                     "so it cannot be applied at all")
        if not allow_mismatch:
            raise PatchMismatchError(
                f"{what}. Use a patch trained for this model, or pass --allow-mismatch "
                "(allow_mismatch=True) to apply it anyway: the shapes fit, but the edit was "
                "learned on another model's hidden states and its effect is unpredictable")
        warnings.warn(f"{what}; applying it anyway because allow_mismatch was given", stacklevel=2)


def base_problems(base: BaseModel) -> list[str]:
    """Problems of the base-model record a patch is bound to."""
    out = []
    if not isinstance(base.architecture, str) or not base.architecture:
        out.append(f"{spec.GENERAL_ARCHITECTURE}: empty, expected the base architecture (e.g. 'llama')")
    fp = base.fingerprint
    if not isinstance(fp, str) or len(fp) != 64 or fp.strip("0123456789abcdef"):
        out.append(f"{spec.BASE_FINGERPRINT}: expected 64 lowercase hex digits, found {str(fp)[:80]!r}")
    for k, v in ((spec.BASE_N_EMBD, base.n_embd), (spec.BASE_N_LAYER, base.n_layer)):
        if not isinstance(v, int) or not 1 <= v <= 1 << 20:
            out.append(f"{k}: {v!r} is not a plausible size (1..{1 << 20})")
    return out


def _provenance_ok(v: Any) -> bool:
    scalar = (str, bool, int, float)
    if isinstance(v, float) and not math.isfinite(v):
        return False
    if isinstance(v, scalar):
        return True
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(
        isinstance(x, scalar) for x in v) and len({type(x) for x in v}) == 1


def identity(base: BaseModel, layer: int, positions: str | PositionRule, rank: int = 4,
             seed: int = 0) -> Patch:
    """A patch that changes nothing (W = R, b = 0): for tests and overhead benchmarks."""
    from .loreft import random_orthonormal
    r = random_orthonormal(rank, base.n_embd, np.random.default_rng(seed))
    return Patch(base, (Intervention(layer, positions, r, r, np.zeros(rank)),), name="identity")


def random_patch(base: BaseModel, specs: Sequence[tuple], scale: float = 1.0, seed: int = 0) -> Patch:
    """A patch of random edits, one per (layer, positions, rank[, type]) (type default loreft):
    for tests and demos.  W is R plus noise for the types with a -R h term, noise otherwise."""
    from .loreft import random_orthonormal
    rng = np.random.default_rng(seed)
    ivs = []
    for layer, pos, rank, *rest in specs:
        itype = types.TYPES[rest[0] if rest else "loreft"]
        r = random_orthonormal(rank, base.n_embd, rng)
        noise = scale * rng.standard_normal((rank, base.n_embd)).astype(np.float32) / np.sqrt(base.n_embd)
        if not itype.orthonormal:  # P unconstrained
            r = r + 0.5 * rng.standard_normal(r.shape).astype(np.float32) / np.sqrt(base.n_embd)
        w = None if spec.WEIGHT not in itype.stored else (r + noise if itype.train_init == "w=r" else noise)
        b = scale * rng.standard_normal(rank).astype(np.float32)
        ivs.append(Intervention(layer, pos, r, w, b, itype.name))
    return Patch(base, tuple(ivs), name="random")
