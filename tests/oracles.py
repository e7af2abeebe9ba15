"""Exactness oracles shared by the backends' tests: patches whose effect llama.cpp can
compute by itself, and a conversation run with and without KV-cache reuse."""
from __future__ import annotations

import numpy as np

from edge_reft.patch import BaseModel, Intervention, Patch, random_patch


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


def second_turn_cached_and_fresh(engine, layer: int, positions: str):
    """A two-turn chat under a strong patch; the second turn generated reusing the first
    turn's KV cache and from scratch (``cache="off"``).  Returns (patch, cached, fresh)."""
    patch = random_patch(engine.base, [(layer, positions, 4)], scale=6.0, seed=3)
    msgs = [{"role": "user", "content": "Name a fruit."}]
    first = engine.generate(messages=msgs, patch=patch, max_tokens=12, stream=False)
    msgs += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And a colour?"}]
    cached = engine.generate(messages=msgs, patch=patch, max_tokens=16, stream=False)
    fresh = engine.generate(messages=msgs, patch=patch, max_tokens=16, stream=False, cache="off")
    return patch, cached, fresh


SWAP_ORDER = ("a", "b", "a", "none", "b", "c", "none", "c", "a")


def swap_patches(base: BaseModel) -> dict[str, Patch | None]:
    """Two strong l1 patches, one f1+l1 (it edits position 0, so shares nothing), and none."""
    return {"a": random_patch(base, [(15, "l1", 4)], scale=8.0, seed=1),
            "b": random_patch(base, [(15, "l1", 4)], scale=8.0, seed=2),
            "c": random_patch(base, [(15, "f1+l1", 4)], scale=8.0, seed=3), "none": None}


def fresh_answers(open_engine, patches: dict, prompt: str, max_tokens: int) -> dict[str, list[int]]:
    """Each patch's greedy answer to ``prompt`` from its own fresh engine (``open_engine()``);
    the patches must all answer differently, or the swap tests could not see a leak."""
    fresh = {}
    for name, p in patches.items():
        with open_engine() as solo:
            fresh[name] = solo.generate(prompt, patch=p, max_tokens=max_tokens, stream=False).tokens
    assert len({tuple(v) for v in fresh.values()}) == len(patches), "the patches must produce different outputs"
    return fresh


def run_swaps(engine, prompt: str, patches: dict, fresh: dict, max_tokens: int) -> list[int]:
    """Generate ``prompt`` under the patches in SWAP_ORDER on one engine (after a no-patch
    run); every answer must equal ``fresh`` (a fresh engine's).  Returns the reused counts."""
    engine.generate(prompt, max_tokens=1, stream=False)
    reused = []
    for name in SWAP_ORDER:
        got = engine.generate(prompt, patch=patches[name], max_tokens=max_tokens, stream=False)
        assert got.tokens == fresh[name], name
        reused.append(got.reused_tokens)
    return reused


def expected_reuse(n: int, saved_states: bool) -> list[int]:
    """For SWAP_ORDER with a prompt of n kept positions: l1 patches and none share all but the
    last positions; "c" shares nothing, unless its own state was saved (its second run)."""
    c = n if saved_states else 0
    return [n, n, n, n, n, 0, c, c, c]


def stepwise_logits(engine, prompt: list[int], cont: list[int], patch) -> np.ndarray:
    """Logits of a prefill of ``prompt`` and then of each token of ``cont`` decoded one at a
    time, as the generate loop runs them (rows: prefill, then each step)."""
    pset = engine.patch_set(patch)
    engine._keep(0)
    rows = [engine._forward(prompt, 0, len(prompt), pset)[-1]]
    for i, tok in enumerate(cont):
        rows.append(engine._forward([tok], len(prompt) + i, len(prompt), pset)[-1])
    return np.stack(rows)
