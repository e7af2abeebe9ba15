"""Patches whose effect llama.cpp can compute by itself (for exactness oracles)."""
from __future__ import annotations

import numpy as np

from edge_reft.patch import BaseModel, Intervention, Patch


def constant_vector_patch(base: BaseModel, layer: int, seed: int) -> tuple[Patch, np.ndarray]:
    """A patch that adds the constant v to every position: R = u (a unit row with
    entries +-0.5, exact in float32), W = R, b = |v|; so R^T(Wh + b - Rh) = b u = v."""
    rng = np.random.default_rng(seed)
    u = np.zeros(base.n_embd, np.float32)
    u[rng.choice(base.n_embd, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    b = np.float32(3.0)
    return Patch(base, (Intervention(layer, "all", u[None], u[None], [b]),)), b * u


def patch_and_control_vector(engine, tokens: list[int], layer: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits with the constant-vector patch, and with llama.cpp's own control vector of the
    same vector at the same layer (llama.cpp's engine; the vector is removed afterwards)."""
    patch, v = constant_vector_patch(engine.base, layer, seed)
    ours = engine.logits(tokens, patch)
    engine.native.set_control_vector(v, layer)
    try:
        oracle = engine.logits(tokens)
    finally:
        engine.native.set_control_vector(None, layer)
    return ours, oracle
