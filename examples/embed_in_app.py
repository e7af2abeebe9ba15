"""Embed edge-reft in an app: a model, a user's patch, a streamed answer.

    python examples/embed_in_app.py [--patch user.reft] [--prompt "..."]

Runs on the embedded SmolLM2 with the patch shipped with edge-reft (one that
answers arithmetic with the bare number); pass your own model and patch.
"""
import argparse

import edge_reft
from edge_reft.models import demo_patch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a .gguf (default: the embedded SmolLM2)")
    ap.add_argument("--patch", default=None, help="a .reft (default: the shipped demo patch)")
    ap.add_argument("--prompt", default="Calculate 17 + 25 =")
    a = ap.parse_args()

    engine = edge_reft.Engine(a.model)                          # llama.cpp, loaded once
    patch = engine.load_patch(a.patch or demo_patch())          # validated, bound to this model
    for label, p in (("without the patch", None), ("with the patch", patch)):
        print(f"[{label}] ", end="", flush=True)
        for piece in engine.generate(a.prompt, patch=p, max_tokens=48):   # streamed as it is generated
            print(piece, end="", flush=True)
        print()
    engine.close()


if __name__ == "__main__":
    main()
