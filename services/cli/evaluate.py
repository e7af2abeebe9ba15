"""``edge-reft eval BASE --patch P --data DATA``: accuracy with and without the patch."""
from __future__ import annotations

import argparse
import json


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="edge-reft eval", description=__doc__)
    ap.add_argument("base", help="a .gguf (evaluated through llama.cpp) or an HF folder (PyTorch)")
    ap.add_argument("--patch", required=True)
    ap.add_argument("--data", required=True, help='JSON Lines: {"prompt", "response"} or {"messages"}')
    ap.add_argument("--limit", type=int, default=None, help="first N examples only")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    from edge_reft.services.evaluate import evaluate_patch
    from edge_reft.fingerprint import base_model
    from edge_reft.reftfile import load_patch

    from edge_reft.errors import ReftError
    if a.limit is not None and a.limit < 1:
        raise ReftError(f"--limit {a.limit}: expected a number of examples >= 1")
    patch = load_patch(a.patch, model=base_model(a.base))
    rows = {"without patch": evaluate_patch(a.base, None, a.data, limit=a.limit),
            "with patch": evaluate_patch(a.base, patch, a.data, limit=a.limit)}
    if a.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'':<14} {'n':>5} {'exact match':>12} {'first token':>12}")
        for k, m in rows.items():
            print(f"{k:<14} {m['n']:>5} {m['exact_match']:>12.3f} {m['first_token']:>12.3f}")
    return 0
