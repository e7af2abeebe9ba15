"""Choosing the next token from logits (numpy; shared by every backend).

The order: penalties, temperature, then top-k, top-p and min-p on the tempered
distribution (as transformers and OpenAI's API do).  Penalties look at the reply's own last ``penalty_last_n`` tokens (what the
model is repeating), never at the prompt, and apply to greedy decoding too:
``repeat_penalty`` divides a positive logit (multiplies a negative one) of a
token seen there (CTRL / llama.cpp); ``frequency_penalty`` subtracts its count
times the value and ``presence_penalty`` the value once (OpenAI).  The defaults
change nothing, so a reply without them is bit for bit the plain argmax or
sample.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from edge_reft.errors import ReftError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0   # 0 = greedy (argmax, ties to the lowest id)
    top_p: float = 1.0
    top_k: int = 0             # 0 = off
    seed: int | None = None
    min_p: float = 0.0         # keep tokens with probability >= min_p x the best one's; 0 = off
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    penalty_last_n: int = 64   # how many of the reply's last tokens the penalties see; 0 = all

    def __post_init__(self) -> None:
        def number(x: object) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x)
        problems = []
        if not (number(self.temperature) and 0 <= self.temperature <= 100):
            problems.append(f"temperature: {self.temperature!r}, expected a number in [0, 100]")
        if not (number(self.top_p) and 0 < self.top_p <= 1):
            problems.append(f"top_p: {self.top_p!r}, expected a number in (0, 1]")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            problems.append(f"top_k: {self.top_k!r}, expected an integer >= 0")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 1 << 63):
            problems.append(f"seed: {self.seed!r}, expected an integer in 0..2^63-1")
        if not (number(self.min_p) and 0 <= self.min_p <= 1):
            problems.append(f"min_p: {self.min_p!r}, expected a number in [0, 1]")
        if not (number(self.repeat_penalty) and 0 < self.repeat_penalty <= 10):
            problems.append(f"repeat_penalty: {self.repeat_penalty!r}, expected a number in (0, 10] "
                            "(1 = off)")
        for name in ("frequency_penalty", "presence_penalty"):
            v = getattr(self, name)
            if not (number(v) and -2 <= v <= 2):
                problems.append(f"{name}: {v!r}, expected a number in [-2, 2] (0 = off)")
        if not (isinstance(self.penalty_last_n, int) and self.penalty_last_n >= 0):
            problems.append(f"penalty_last_n: {self.penalty_last_n!r}, expected an integer >= 0 (0 = all)")
        if problems:
            raise ReftError("sampling: " + "; ".join(problems))

    @property
    def penalized(self) -> bool:
        return self.repeat_penalty != 1 or self.frequency_penalty != 0 or self.presence_penalty != 0


MORE = ("min_p", "repeat_penalty", "frequency_penalty", "presence_penalty", "penalty_last_n")


def sampling_params(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                    seed: int | None = None, **more: float) -> SamplingParams:
    """SamplingParams from an engine's keywords; ``more`` are the optional ones (``MORE``)."""
    unknown = sorted(set(more) - set(MORE))
    if unknown:
        raise ReftError(f"sampling: unknown option(s) {', '.join(unknown)}; expected temperature, "
                        f"top_p, top_k, seed, {', '.join(MORE)}")
    return SamplingParams(temperature, top_p, top_k, seed, **more)


def penalize(logits: np.ndarray, history: Sequence[int], p: SamplingParams) -> np.ndarray:
    """``logits`` (a float64 copy) with the penalties of ``p`` for the tokens in ``history``."""
    window = history[-p.penalty_last_n:] if p.penalty_last_n else history
    x = logits.astype(np.float64)
    if not len(window):
        return x
    ids, counts = np.unique(np.asarray(window, np.int64), return_counts=True)
    v = x[ids]
    if p.repeat_penalty != 1:
        v = np.where(v > 0, v / p.repeat_penalty, v * p.repeat_penalty)
    x[ids] = v - counts * p.frequency_penalty - p.presence_penalty
    return x


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        """The next token after ``history``, the reply's tokens so far."""
        p = self.params
        if p.penalized:
            logits = penalize(logits, history, p)
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
        if p.min_p > 0:  # probs are sorted: the kept ones are a prefix
            keep = int(np.count_nonzero(probs >= p.min_p * probs[0]))
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        return int(order[self.rng.choice(order.size, p=probs)])
