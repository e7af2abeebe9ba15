"""How well a patch does on a JSONL data set, measured through the runtime users run.

exact_match: the greedy reply equals the reference (after stripping
whitespace); first_token: the first generated token is the reference's first
token.  A GGUF base is evaluated through its backend (llama.cpp); an HF folder
through the PyTorch reference (transformers + the torch math).  Both go
through one scoring loop, ``score``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

from edge_reft.chat import Prompter
from edge_reft.dataset import read_jsonl
from edge_reft.errors import ReftError
from edge_reft.patch import Patch

Records = Sequence[tuple[list[dict], str]]
# greedy reply to ``prompt`` ids: (reply ids, reply text), at most ``max_tokens``, stopping at ``stop``
Reply = Callable[[list[int], int, int], tuple[list[int], str]]


def score(records: Records, prompter: Prompter, reply: Reply) -> dict[str, float]:
    """Greedy-decode every prompt with ``reply`` and score the replies."""
    exact = first = 0
    for msgs, reference in records:
        prompt, target = prompter.example(msgs, reference)
        tokens, text = reply(prompt, len(target) + 8, target[-1])
        exact += text.strip() == reference.strip()
        first += (tokens[:1] or [None])[0] == target[0]
    n = len(records)
    return {"n": n, "exact_match": exact / n, "first_token": first / n}


def evaluate(engine, records: Records, patch: Patch | None) -> dict[str, float]:
    """Scores of ``engine`` (an Engine) on ``records``, with ``patch`` or without."""
    def reply(prompt: list[int], max_tokens: int, stop: int) -> tuple[list[int], str]:
        r = engine.generate(prompt_tokens=prompt, patch=patch, max_tokens=max_tokens, stream=False)
        return r.tokens, r.text
    return score(records, engine.prompter(), reply)


def evaluate_patch(base: str | os.PathLike[str], patch: Patch | None, data: str | os.PathLike[str],
                   n_ctx: int = 2048, limit: int | None = None) -> dict[str, float]:
    """Scores on ``data`` (its first ``limit`` examples when given) with ``patch`` or without."""
    if limit is not None and (type(limit) is not int or limit < 1):
        raise ReftError(f"--limit {limit!r}: expected a number of examples >= 1")
    records = read_jsonl(data)[:limit]
    if Path(base).is_file():
        from edge_reft.runtime import Engine
        with Engine(base, n_ctx=n_ctx) as engine:
            return evaluate(engine, records, patch)
    return _evaluate_torch(Path(base), records, patch)


def _evaluate_torch(folder: Path, records: Records, patch: Patch | None) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM

    from edge_reft.hftokenizer import HFTokenizer
    from edge_reft.train.hf import reference_greedy
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = HFTokenizer(folder)

    def reply(prompt: list[int], max_tokens: int, stop: int) -> tuple[list[int], str]:
        out = reference_greedy(model, prompt, [patch] if patch else [], max_tokens, stop_ids=[stop])
        return out, tok.decode(out)
    return score(records, tok.prompter(), reply)
