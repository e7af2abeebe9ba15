"""How pyreft stores each intervention type, and the math between its files and a patch.

pyreft's ``LoreftIntervention`` saves ``rotate_layer`` (R^T, computed) and
``learned_source``'s Linear; the other classes save ``nn.Module.state_dict()``.
For ConsReFT, LobiReFT and DiReFT that holds torch's orthogonal
parametrization of R^T, not R^T itself: ``rotate_layer.parametrizations.weight
.original`` X (d, r) and, with torch's default trivialization, ``...weight.0
.base`` B (d, d).  torch's forward for a tall X (the Householder map, its
default for a non-square matrix) is, in ``orthogonal_weight`` below:

    A = tril(X, -1);  tau_j = 2 / (1 + |A[:, j]|^2);  Q = householder_product(A, tau)
    R^T = B @ (Q * trunc(diag(X)))

computed here in float64 (torch does it in float32 every forward).  Writing
goes the other way: X = -I (d x r) makes the product the identity columns, so
B's first r columns are R^T and the rest an orthonormal completion.  No torch.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_reft import spec
from edge_reft.errors import ReftError

ORIGINAL = "rotate_layer.parametrizations.weight.original"
BASE = "rotate_layer.parametrizations.weight.0.base"
BUFFERS = frozenset({"embed_dim", "interchange_dim"})  # nn.Module.state_dict() of the other classes


@dataclass(frozen=True)
class Layout:
    """The state dict of one or more pyreft classes: tensor name -> dims ('r' rank, 'd' n_embd)."""
    types: tuple[str, ...]     # edge-reft types that save exactly this (two: ambiguous by tensors)
    required: dict[str, str]
    optional: dict[str, str]


LAYOUTS = (
    Layout(("loreft",), {"weight": "rd", "bias": "r", "rotate_layer": "dr"}, {}),
    Layout(("noreft", "nodireft"), {"proj_layer.weight": "rd", "learned_source.weight": "rd",
                                    "learned_source.bias": "r"}, {"proj_layer.bias": "r"}),
    Layout(("direft",), {ORIGINAL: "dr", "learned_source.weight": "rd", "learned_source.bias": "r"},
           {BASE: "dd"}),
    Layout(("consreft", "lobireft"), {ORIGINAL: "dr", "learned_source": "r"}, {BASE: "dd"}),
)


def layout_of(names: set[str]) -> Layout:
    """The layout whose tensors are exactly ``names`` (pyreft's buffers aside)."""
    names = set(names) - BUFFERS
    for lay in LAYOUTS:
        if set(lay.required) <= names <= set(lay.required) | set(lay.optional):
            return lay
    raise ReftError(f"tensors {sorted(names)[:8]}: not the state dict of a pyreft intervention "
                    f"(LoReFT saves {sorted(LAYOUTS[0].required)}; the others save nn.Module's "
                    f"state_dict: learned_source, rotate_layer or proj_layer)")


def check_shapes(lay: Layout, arrays: dict[str, np.ndarray], n_embd: int) -> int:
    """The rank, after checking every tensor of ``lay`` against it and n_embd."""
    dims = {**lay.required, **{k: v for k, v in lay.optional.items() if k in arrays}}
    first = next(k for k, v in dims.items() if len(v) == 2 and v != "dd")
    a = arrays[first]
    if a.ndim != 2:
        raise ReftError(f"{first}: shape {a.shape}, expected {'(rank, n_embd)' if dims[first] == 'rd' else '(n_embd, rank)'}")
    r, d = a.shape if dims[first] == "rd" else a.shape[::-1]
    if d != n_embd:
        raise ReftError(f"{first}: shape {a.shape}: hidden size {d}, but the base model has n_embd "
                        f"{n_embd} (was this checkpoint trained on another model?)")
    problems = [f"{k}: shape {arrays[k].shape}, expected {want} (rank {r}, n_embd {d})"
                for k, v in dims.items() if arrays[k].shape != (want := tuple({"r": r, "d": d}[c] for c in v))]
    if problems:
        raise ReftError("; ".join(problems))
    if r >= d and (ORIGINAL in dims):
        raise ReftError(f"{ORIGINAL}: rank {r} = n_embd: torch parametrizes a square R with the matrix "
                        "exponential, which this converter does not evaluate")
    return r


def read(itype: str, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, bool]:
    """(rotate, weight or None, bias, exact) of a patch from one pyreft state dict; ``exact`` is
    False when a value was computed (R from its parametrization, b1 - b2), not copied."""
    if itype == "loreft":
        return arrays["rotate_layer"].T, arrays["weight"], arrays["bias"], True
    if itype in ("noreft", "nodireft"):
        bias, exact = arrays["learned_source.bias"], True
        if itype == "noreft" and "proj_layer.bias" in arrays:  # W1 h + b1 - (W2 h + b2): one bias
            bias, exact = bias - arrays["proj_layer.bias"], False
        # NodiReFT's forward uses proj_layer.weight only: its bias, if any, has no effect
        return arrays["proj_layer.weight"], arrays["learned_source.weight"], bias, exact
    rotate = orthogonal_weight(arrays[ORIGINAL], arrays.get(BASE)).T
    if itype == "direft":
        return rotate, arrays["learned_source.weight"], arrays["learned_source.bias"], False
    return rotate, None, arrays["learned_source"], False


def orthogonal_weight(original: np.ndarray, base: np.ndarray | None) -> np.ndarray:
    """torch.nn.utils.parametrizations.orthogonal's weight for a tall (d, r) ``original``
    (Householder map), in float64."""
    x = np.asarray(original, np.float64)
    d, r = x.shape
    a = np.tril(x, -1)
    tau = 2.0 / (1.0 + np.sum(a * a, axis=0))
    q = np.eye(d, r)
    for j in reversed(range(r)):  # LAPACK orgqr: H_0 H_1 ... H_{r-1} applied to I[:, :r]
        v = a[:, j].copy()
        v[j] = 1.0
        q -= tau[j] * np.outer(v, v @ q)
    signs = np.trunc(np.diagonal(x))  # torch: X.diagonal().int()
    if np.any(signs == 0):
        raise ReftError(f"{ORIGINAL}: its diagonal holds values in (-1, 1) "
                        f"({np.diagonal(x)[signs == 0][:3]}), which torch's map truncates to 0, so "
                        "pyreft's own R has zero columns (weight decay on the parametrization?)")
    q = q * signs
    return q if base is None else np.asarray(base, np.float64) @ q


def orthogonal_state(rotate: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(original, base) float32 whose torch parametrization gives exactly R^T: original = -I
    (d, r), base = [R^T | an orthonormal completion]."""
    r, d = rotate.shape
    original = np.zeros((d, r), np.float32)
    original[np.arange(r), np.arange(r)] = -1.0
    rt = np.asarray(rotate, np.float64).T
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(np.concatenate([rt, rng.standard_normal((d, d - r))], axis=1))
    base = np.concatenate([rotate.T.astype(np.float32), q[:, r:].astype(np.float32)], axis=1)
    return original, np.ascontiguousarray(base)


def write(itype: str, rotate: np.ndarray, weight: np.ndarray | None, bias: np.ndarray,
          n_embd: int) -> OrderedDict[str, Any]:
    """The state dict pyreft's ``load_state_dict`` takes for this type (numpy arrays; buffers
    as Python ints), in the class's own order."""
    if itype == "loreft":  # LoreftIntervention.state_dict(): learned_source's Linear, then R^T
        return OrderedDict(weight=weight, bias=bias, rotate_layer=rotate.T)
    out: OrderedDict[str, Any] = OrderedDict(embed_dim=n_embd, interchange_dim=n_embd)
    if itype in ("noreft", "nodireft"):  # proj_layer without a bias (add_bias=False)
        out.update({"proj_layer.weight": rotate, "learned_source.weight": weight,
                    "learned_source.bias": bias})
        return out
    original, base = orthogonal_state(rotate)
    if itype == "direft":
        out.update({ORIGINAL: original, BASE: base, "learned_source.weight": weight,
                    "learned_source.bias": bias})
    else:  # ConsReFT / LobiReFT: learned_source is a bare [r] parameter, registered first
        out = OrderedDict([("learned_source", bias), ("embed_dim", n_embd), ("interchange_dim", n_embd),
                           (ORIGINAL, original), (BASE, base)])
    return out


def storage_dtype(dtypes: set[str], exact: bool) -> int:
    """A patch stores 16-bit values losslessly only when all were of that one type and copied."""
    if exact and len(dtypes) == 1:
        return {"bfloat16": spec.GGML_BF16, "float16": spec.GGML_F16}.get(next(iter(dtypes)), spec.GGML_F32)
    return spec.GGML_F32
