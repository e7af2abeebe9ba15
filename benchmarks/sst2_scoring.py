"""SST-2 accuracy by log-prob: is "positive" or "negative" the likelier first reply token?

Through llama.cpp on the Q4_1 GGUF (what users get), or through PyTorch on
the same Q4_1 blocks (what training sees): the train/serve parity check.
"""
from __future__ import annotations

from typing import Any, Sequence


def _label_ids(prompter) -> tuple[int, int]:
    msgs = [{"role": "user", "content": "x"}]
    neg, pos = (prompter.example(msgs, label)[1][0] for label in ("negative", "positive"))
    assert neg != pos
    return neg, pos


def answers(patch_path: str | None, records: Sequence[dict], model: str | None = None) -> list[str]:
    """The likelier label per record, through ``model`` (a GGUF, or an export-onnx folder)."""
    from edge_reft.models import default_model
    from edge_reft.runtime import Engine
    with Engine(model or default_model(), n_ctx=1024) as e:
        patch = e.load_patch(patch_path) if patch_path else None
        neg, pos = _label_ids(e.prompter())
        out = []
        for r in records:
            last = e.logits(e.prompt_tokens(r["prompt"]), patch, last_only=True)[-1]
            out.append("positive" if last[pos] > last[neg] else "negative")
    return out


def score(patch_path: str | None, records: Sequence[dict], model: str | None = None) -> float:
    got = answers(patch_path, records, model)
    return sum(a == r["response"] for a, r in zip(got, records)) / len(records)


def score_torch(model: Any, prompter, patch, records: Sequence[dict]) -> float:
    import torch
    from edge_reft.train.hf import reference_logits
    neg, pos = _label_ids(prompter)
    hits = 0
    with torch.no_grad():
        for r in records:
            last = reference_logits(model, prompter.prompt(r["prompt"]), [patch] if patch else [])[-1]
            hits += ("positive" if last[pos] > last[neg] else "negative") == r["response"]
    return hits / len(records)
