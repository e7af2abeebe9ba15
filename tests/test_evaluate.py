"""Scoring (services/evaluate.py): each metric by hand, the held-out loss on the real model,
and the eval command's progress and table."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edge_reft.services.evaluate import evaluate, score
from edge_reft.tasks import write_jsonl


def test_metrics_by_hand(engine_q4):
    prompter = engine_q4.prompter()
    records = [([{"role": "user", "content": "a"}], "Paris"),
               ([{"role": "user", "content": "b"}], "Sure.\nFair winds, Cap"),
               ([{"role": "user", "content": "c"}], "42")]
    replies = {"a": "Paris", "b": "Of course!\nFair winds, Cap", "c": "It is 42, I think"}

    def reply(prompt, max_tokens, stop):
        text = next(v for k, v in replies.items() if prompter.example([{"role": "user", "content": k}], "x")[0] == prompt)
        return engine_q4._tokenize(text, add_special=False), text
    said = []
    m = score(records, prompter, reply, say=said.append)
    assert m["n"] == 3 and m["exact_match"] == pytest.approx(1 / 3)
    assert m["contains"] == pytest.approx(2 / 3) and m["ends_like"] == pytest.approx(2 / 3)
    assert said[-1] == "3/3 scored" and "loss" not in m


def test_loss_prefers_the_models_own_reply(engine_q4):
    """Teacher-forced loss: a reference the model itself would say costs less than a random one."""
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    own = engine_q4.generate(messages=msgs, max_tokens=12, stream=False).text
    m_own = evaluate(engine_q4, [(msgs, own)], None)
    m_odd = evaluate(engine_q4, [(msgs, "Zebra quantum marmalade ladder.")], None)
    assert m_own["first_token"] == 1.0
    assert 0 < m_own["loss"] < m_odd["loss"]


def test_eval_command_prints_progress_and_every_metric(smol_q4, tmp_path):
    from edge_reft.patch import random_patch
    from edge_reft.reftfile import save_patch
    from edge_reft.tasks import sst2_records
    from edge_reft.fingerprint import from_gguf
    data = write_jsonl(sst2_records("test", 4), tmp_path / "d.jsonl")
    patch = save_patch(random_patch(from_gguf(smol_q4), [(15, "l1", 2)]), tmp_path / "p.reft")
    r = subprocess.run([sys.executable, "-m", "edge_reft", "eval", "--patch", str(patch), "--data", str(data),
                        "--json"], capture_output=True, text=True, timeout=300)  # the embedded model
    assert r.returncode == 0, r.stderr
    assert "[eval] with patch: 4/4 scored" in r.stderr
    rows = json.loads(r.stdout)
    assert set(rows["with patch"]) == {"n", "exact_match", "first_token", "contains", "ends_like", "loss"}
