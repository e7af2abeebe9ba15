"""``edge-reft eval BASE --patch P --data DATA``: scores with and without the patch.

exact match and first token (answers, labels), contains (a fact inside a longer
reply), ends like (the reply's last line is the reference's: a style or sign-off),
loss (teacher-forced NLL per reference token; lower is better; GGUF bases)."""
from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    from .common import add_model, model_of, verb_parser
    ap = verb_parser("eval", __doc__, "edge-reft eval -m model.gguf --patch me.reft --data held_out.jsonl")
    add_model(ap, "a .gguf (evaluated through llama.cpp) or an HF folder (PyTorch)", "base")
    ap.add_argument("--patch", required=True, help="the .reft to evaluate")
    ap.add_argument("--data", required=True, help='JSON Lines: {"prompt", "response"} or {"messages"}')
    ap.add_argument("--limit", type=int, default=None, help="first N examples only")
    ap.add_argument("--json", action="store_true", help="print the scores as JSON")
    a = ap.parse_args(argv)
    a.base = model_of(a, "base")
    from edge_reft.services.evaluate import evaluate_patch
    from edge_reft.fingerprint import base_model
    from edge_reft.reftfile import load_patch

    from edge_reft.errors import ReftError
    if a.limit is not None and a.limit < 1:
        raise ReftError(f"--limit {a.limit}: expected a number of examples >= 1")
    patch = load_patch(a.patch, model=base_model(a.base))
    rows = {}
    for label, p in (("without patch", None), ("with patch", patch)):
        def say(msg: str, label: str = label) -> None:
            print(f"[eval] {label}: {msg}", file=sys.stderr, flush=True)
        rows[label] = evaluate_patch(a.base, p, a.data, limit=a.limit, say=say)
    if a.json:
        print(json.dumps(rows, indent=2))
    else:
        cols = [k for k in ("exact_match", "first_token", "contains", "ends_like", "loss") if k in rows["with patch"]]
        print(f"{'':<14} {'n':>5} " + " ".join(f"{c.replace('_', ' '):>12}" for c in cols))
        for k, m in rows.items():
            print(f"{k:<14} {m['n']:>5} " + " ".join(f"{m[c]:>12.3f}" for c in cols))
    return 0
