"""Choosing the next token from logits (numpy; shared by every backend)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_reft.errors import ReftError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0   # 0 = greedy (argmax, ties to the lowest id)
    top_p: float = 1.0
    top_k: int = 0             # 0 = off
    seed: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature <= 100):
            problems.append(f"temperature: {self.temperature!r}, expected a number in [0, 100]")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            problems.append(f"top_p: {self.top_p!r}, expected a number in (0, 1]")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            problems.append(f"top_k: {self.top_k!r}, expected an integer >= 0")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 1 << 63):
            problems.append(f"seed: {self.seed!r}, expected an integer in 0..2^63-1")
        if problems:
            raise ReftError("sampling: " + "; ".join(problems))


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        p = self.params
        if p.temperature == 0:
            return int(np.argmax(logits))
        x = logits.astype(np.float64)
        # relative to the best logit first: a tiny temperature (1e-320) then gives -inf, never NaN
        with np.errstate(over="ignore", divide="ignore"):
            x = (x - x.max()) / p.temperature
        ids = np.arange(x.size)
        if p.top_k and p.top_k < x.size:
            ids = np.argpartition(-x, p.top_k - 1)[:p.top_k]
        order = ids[np.argsort(-x[ids], kind="stable")]
        probs = np.exp(x[order] - x[order[0]])
        probs /= probs.sum()
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        return int(order[self.rng.choice(order.size, p=probs)])
