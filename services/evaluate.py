"""How well a patch does on a JSONL data set, measured through the runtime users run.

Each metric fits a kind of task:
- exact_match: the greedy reply equals the reference (whitespace stripped): answers, labels;
- first_token: the first generated token is the reference's: classification;
- contains: the reference occurs in the reply: facts inside a longer answer;
- ends_like: the reply's last line equals the reference's last line: a style or sign-off;
- loss: mean negative log-likelihood per reference token, teacher-forced (nats; lower is
  better): how well the patch predicts the held-out replies, whatever their form.
A GGUF base is evaluated through its backend (llama.cpp); an HF folder
through the PyTorch reference (transformers + the torch math).  Both go
through one scoring loop, ``score``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from edge_reft.chat import Prompter
from edge_reft.dataset import read_jsonl
from edge_reft.errors import ReftError
from edge_reft.patch import Patch

Records = Sequence[tuple[list[dict], str]]
# greedy reply to ``prompt`` ids: (reply ids, reply text), at most ``max_tokens``, stopping at ``stop``
Reply = Callable[[list[int], int, int], tuple[list[int], str]]


# mean NLL of ``target`` after ``prompt`` (teacher-forced), or None where not measured
Loss = Callable[[list[int], list[int]], float]


def _last_line(text: str) -> str:
    lines = [x.strip() for x in text.strip().splitlines() if x.strip()]
    return lines[-1] if lines else ""


def score(records: Records, prompter: Prompter, reply: Reply, loss: Loss | None = None,
          say: Callable[[str], None] | None = None) -> dict[str, float]:
    """Greedy-decode every prompt with ``reply`` and score the replies (``say`` hears progress)."""
    exact = first = contains = ends = 0
    nll, n = 0.0, len(records)
    step = max(1, n // 10)
    for i, (msgs, reference) in enumerate(records, 1):
        prompt, target = prompter.example(msgs, reference)
        tokens, text = reply(prompt, len(target) + 8, target[-1])
        ref = reference.strip()
        exact += text.strip() == ref
        first += (tokens[:1] or [None])[0] == target[0]
        contains += bool(ref) and ref in text
        ends += _last_line(text) == _last_line(ref)
        if loss is not None:
            nll += loss(prompt, target)
        if say and (i % step == 0 or i == n):
            say(f"{i}/{n} scored")
    out = {"n": n, "exact_match": exact / n, "first_token": first / n, "contains": contains / n,
           "ends_like": ends / n}
    if loss is not None:
        out["loss"] = nll / n
    return out


def evaluate(engine, records: Records, patch: Patch | None,
             say: Callable[[str], None] | None = None) -> dict[str, float]:
    """Scores of ``engine`` (an Engine) on ``records``, with ``patch`` or without."""
    def reply(prompt: list[int], max_tokens: int, stop: int) -> tuple[list[int], str]:
        r = engine.generate(prompt_tokens=prompt, patch=patch, max_tokens=max_tokens, stream=False)
        return r.tokens, r.text

    def loss(prompt: list[int], target: list[int]) -> float:
        logits = engine.logits(prompt + target[:-1], patch=patch, n_prompt=len(prompt))[len(prompt) - 1:]
        x = logits.astype(np.float64)
        m = x.max(axis=1, keepdims=True)
        logz = (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))[:, 0]
        return float(np.mean(logz - x[np.arange(len(target)), target]))
    return score(records, engine.prompter(), reply, loss, say)


def evaluate_patch(base: str | os.PathLike[str], patch: Patch | None, data: str | os.PathLike[str],
                   n_ctx: int = 2048, limit: int | None = None,
                   say: Callable[[str], None] | None = None) -> dict[str, float]:
    """Scores on ``data`` (its first ``limit`` examples when given) with ``patch`` or without."""
    if limit is not None and (type(limit) is not int or limit < 1):
        raise ReftError(f"--limit {limit!r}: expected a number of examples >= 1")
    records = read_jsonl(data)[:limit]
    if Path(base).is_file():
        from edge_reft.runtime import Engine
        with Engine(base, n_ctx=n_ctx) as engine:
            return evaluate(engine, records, patch, say)
    return _evaluate_torch(Path(base), records, patch, say)


def _evaluate_torch(folder: Path, records: Records, patch: Patch | None,
                    say: Callable[[str], None] | None = None) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM

    from edge_reft.hftokenizer import HFTokenizer
    from edge_reft.train.hf import reference_greedy
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = HFTokenizer(folder)

    def reply(prompt: list[int], max_tokens: int, stop: int) -> tuple[list[int], str]:
        out = reference_greedy(model, prompt, [patch] if patch else [], max_tokens, stop_ids=[stop])
        return out, tok.decode(out)
    return score(records, tok.prompter(), reply, None, say)
