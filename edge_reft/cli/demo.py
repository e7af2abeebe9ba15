"""``edge-reft demo``: a real patch on the embedded SmolLM2, before and after.

Uses the patch shipped with the package (edge_reft/data/, trained with
``edge-reft train`` by examples/personalize_offline.py), or a random patch
if none is there, so the demo always shows the machinery end to end.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

SHIPPED = Path(__file__).resolve().parent.parent / "data"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="edge-reft demo", description=__doc__)
    ap.add_argument("--patch", help="a .reft patch to show (default: the shipped example)")
    ap.add_argument("-n", "--max-tokens", type=int, default=48)
    a = ap.parse_args(argv)

    from edge_reft.cli.inspect import format_patch
    from edge_reft.models import default_model
    from edge_reft.patch import random_patch
    from edge_reft.reftfile import save_patch
    from edge_reft.runtime import Engine

    model = default_model()
    print(f"model: {model}", file=sys.stderr)
    with Engine(model, n_ctx=1024) as engine:
        shipped = sorted(SHIPPED.glob("*.reft")) if SHIPPED.is_dir() else []
        path = Path(a.patch) if a.patch else (shipped[0] if shipped else None)
        prompts = ["What should I cook tonight?", "Tell me about the moon."]
        tmp = None
        if path is None:
            tmp = tempfile.TemporaryDirectory()
            path = save_patch(random_patch(engine.base, [(15, "l1", 4)], scale=8.0), Path(tmp.name) / "random.reft")
            print("no shipped patch found: using a random one", file=sys.stderr)
        t = time.perf_counter()
        patch = engine.load_patch(path)
        print(f"\n{format_patch(patch)}\n(loaded and validated in {(time.perf_counter() - t) * 1e3:.2f} ms)\n")
        if patch.provenance.get("prompts"):
            prompts = list(patch.provenance["prompts"])
        for prompt in prompts:
            print(f"> {prompt}")
            for label, p in (("without patch", None), ("with patch", patch)):
                r = engine.generate(prompt, patch=p, max_tokens=a.max_tokens, stream=False)
                print(f"  [{label}] {r.text.strip()}")
            print()
        if tmp is not None:
            tmp.cleanup()
    return 0
