"""``edge-reft demo``: a real patch on the embedded SmolLM2, before and after.

The patch shipped with edge-reft (edge_reft/data/demo.reft, made by
examples/personalize_offline.py) taught the model to answer arithmetic with
the bare number; ``--patch`` shows another one.
"""
from __future__ import annotations

import sys
import time

from .common import verb_parser

PROMPTS = ["Calculate 48 + 19 =", "Calculate 90 - 37 =", "Calculate 7 + 85 ="]


def main(argv: list[str]) -> int:
    ap = verb_parser("demo", __doc__, "edge-reft demo --patch me.reft")
    ap.add_argument("--patch", help="a .reft patch for the embedded model (default: the shipped one)")
    ap.add_argument("-n", "--max-tokens", type=int, default=40)
    a = ap.parse_args(argv)

    from edge_reft.services.cli.inspect import format_patch
    from edge_reft.models import default_model, demo_patch
    from edge_reft.runtime import Engine

    model = default_model()
    print(f"model: {model}", file=sys.stderr)
    with Engine(model, n_ctx=1024) as engine:
        t = time.perf_counter()
        patch = engine.load_patch(a.patch or demo_patch())
        print(f"\n{format_patch(patch)}\n(loaded and validated in {(time.perf_counter() - t) * 1e3:.2f} ms)\n")
        for prompt in PROMPTS:
            print(f"> {prompt}")
            for label, p in (("without patch", None), ("with patch   ", patch)):
                r = engine.generate(prompt, patch=p, max_tokens=a.max_tokens, stream=False)
                print(f"  [{label}] {r.text.strip()}")
            print()
    return 0
