"""How well a patch does on a JSONL data set, measured through the runtime users run.

exact_match: the greedy reply equals the reference (after stripping
whitespace); first_token: the first generated token is the reference's first
token.  A GGUF base is evaluated through llama.cpp; an HF folder through the
PyTorch reference (transformers + the torch math).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .patch import Patch


def evaluate(engine, records: Sequence[tuple[list[dict], str]], patch: Patch | None) -> dict[str, float]:
    """Greedy-decode every prompt with ``engine`` (an Engine) and score the replies."""
    prompter = engine.prompter()
    exact = first = 0
    for msgs, reply in records:
        prompt, target = prompter.example(msgs, reply)
        r = engine.generate(prompt_tokens=prompt, patch=patch, max_tokens=len(target) + 8, stream=False)
        exact += r.text.strip() == reply.strip()
        first += (r.tokens[:1] or [None])[0] == target[0]
    n = len(records)
    return {"n": n, "exact_match": exact / n, "first_token": first / n}


def evaluate_patch(base: str | os.PathLike[str], patch: Patch | None, data: str | os.PathLike[str],
                   n_ctx: int = 2048, limit: int | None = None) -> dict[str, float]:
    """Scores on ``data`` (its first ``limit`` examples when given) with ``patch`` or without."""
    from .dataset import read_jsonl
    from .errors import ReftError
    if limit is not None and (type(limit) is not int or limit < 1):
        raise ReftError(f"--limit {limit!r}: expected a number of examples >= 1")
    records = read_jsonl(data)[:limit]
    if Path(base).is_file():
        from .runtime import Engine
        with Engine(base, n_ctx=n_ctx) as engine:
            return evaluate(engine, records, patch)
    return _evaluate_torch(Path(base), records, patch)


def _evaluate_torch(folder: Path, records, patch: Patch | None) -> dict[str, float]:
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from .hf import reference_greedy
    from .dataset import prompter_for
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    prompter, close = prompter_for(folder)
    exact = first = 0
    try:
        for msgs, reply in records:
            prompt, target = prompter.example(msgs, reply)
            out = reference_greedy(model, prompt, [patch] if patch else [], len(target) + 8,
                                   stop_ids=[target[-1]])
            exact += tok.decode(out).strip() == reply.strip()
            first += (out[:1] or [None])[0] == target[0]
    finally:
        close()
    n = len(records)
    return {"n": n, "exact_match": exact / n, "first_token": first / n}
