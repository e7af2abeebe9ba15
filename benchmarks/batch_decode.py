"""Continuous batching in one process: tokens/s of ``Engine.generate_many`` by slot count.

    python benchmarks/batch_decode.py [--model M.gguf] [--ngl 99] [--requests 64] [--slots 1,8,32]

The same requests (chat prompts, greedy, ``--max-tokens`` each) through an
engine with 1, 8, 32 ... slots, once with no patches and once with a different
patch per request (l1, f1+l1, all-positions and f2+l2 patches in turn), in
interleaved rounds.  Every answer of every configuration is compared with the
one-slot run's (a batch must not change an answer); the table shows tokens/s,
the speed-up over one slot, and the answers that differ.  With ``--ngl`` the
layers run on a GPU (the device's CUDA build: benchmarks/gpu/batch.sh).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from common import table

PROMPTS = ["Name a fruit.", "What is the capital of Italy?", "Say something kind.", "Count to three.",
           "Give me a colour.", "What do cats eat?", "Describe rain in a few words.", "Name a planet."]
SPECS = [(3, "l1", 4), (2, "f1+l1", 4), (4, "all", 2), (5, "f2+l2", 4)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a .gguf (default: the embedded SmolLM2)")
    ap.add_argument("--ngl", type=int, default=0, help="layers on the GPU")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--slots", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--kv", default="auto", help="KV layouts to compare, comma-separated: streams (one per "
                    "slot), unified (one for all), auto (the engine's choice)")
    a = ap.parse_args()
    from edge_reft.models import default_model
    from edge_reft.patch import random_patch
    from edge_reft.runtime import Engine
    model = a.model or str(default_model())
    layouts = {"auto": None, "streams": False, "unified": True}
    engines = {(s, kv): Engine(model, slots=s, n_ctx=512, n_gpu_layers=a.ngl, n_threads=a.threads,
                               kv_unified=layouts[kv])
               for s in a.slots for kv in (a.kv.split(",") if s > 1 else ["auto"])}
    first = next(iter(engines))
    base = engines[first].base
    layers = base.n_layer
    patches = [random_patch(base, [(min(L, layers - 1) if L < layers else layers - 1, pos, r)], scale=8.0,
                            seed=100 + i) for i, (L, pos, r) in enumerate(SPECS * (a.requests // len(SPECS) + 1))]
    work = {"no patches": [None] * a.requests, "a patch each": patches[:a.requests]}
    reqs = {k: [dict(messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], patch=p,
                     max_tokens=a.max_tokens) for i, p in enumerate(v)] for k, v in work.items()}
    for e in engines.values():  # warm-up
        e.generate_many(reqs["a patch each"][:2])
    wall = {(k, s): 0.0 for k in reqs for s in engines}
    answers: dict = {}
    tokens: dict = {}
    for r in range(a.rounds):
        order = [(k, s) for k in reqs for s in engines]
        for k, s in (order if r % 2 == 0 else order[::-1]):
            t = time.perf_counter()
            got = engines[s].generate_many(reqs[k])
            wall[k, s] += time.perf_counter() - t
            answers[k, s] = [c.tokens for c in got]
            tokens[k, s] = tokens.get((k, s), 0) + sum(len(c.tokens) for c in got)
        print(f"  round {r + 1}/{a.rounds} done", file=sys.stderr)
    rows = []
    for k in reqs:
        one = tokens[k, first] / wall[k, first]
        for s in engines:
            tps = tokens[k, s] / wall[k, s]
            differ = sum(x != y for x, y in zip(answers[k, s], answers[k, first]))
            rows.append([k, s[0], "unified" if engines[s].kv_unified else "streams", tps, tps / one, differ])
    dev = "GPU, --ngl %d" % a.ngl if a.ngl else f"CPU, {a.threads or os.cpu_count()} threads"
    print(table(["requests", "slots", "KV", "tokens/s", f"x {first[0]} slot", "answers differing"], rows,
                title=f"\n{os.path.basename(model)} ({dev}): {a.requests} chat requests, {a.max_tokens} new tokens "
                      f"at most, greedy, {a.rounds} interleaved rounds"))
    for e in engines.values():
        e.close()


if __name__ == "__main__":
    main()
