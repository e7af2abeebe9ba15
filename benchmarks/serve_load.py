"""A load test of `edge-reft serve`: many clients, many patches, no leaks.

    python benchmarks/serve_load.py [--requests 200] [--rounds 4] [--clients 8] [--workers 2]

A real server on 127.0.0.1 (bounded: a fixed number of requests, each with
a timeout).  Two phases: every request with no patch, and the same prompts
with 4 different patches and none, mixed.  They alternate in rounds (ABBA,
``--requests`` per phase in all), so drift hits both alike.  Every greedy
answer is compared with the same request run alone (a cross-user leak would
differ); errors, p50/p95 latency and throughput are printed, and the mixed
phase's throughput relative to the no-patch phase.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import table

PROMPTS = ["Name a fruit.", "What is the capital of Italy?", "Say something kind.", "Count to three.",
           "Give me a colour.", "What do cats eat?", "Describe rain in a few words.", "Name a planet."]


async def phase(url: str, jobs: list[tuple[str, str | None]], clients: int, max_tokens: int):
    import httpx
    sem = asyncio.Semaphore(clients)
    out: list = [None] * len(jobs)
    async with httpx.AsyncClient(base_url=url, timeout=300) as c:
        async def one(i: int, prompt: str, patch: str | None):
            body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                    "temperature": 0}
            if patch:
                body["patch"] = patch
            async with sem:
                t = time.perf_counter()
                r = await c.post("/v1/chat/completions", json=body)
                dt = time.perf_counter() - t
            ok = r.status_code == 200
            out[i] = (ok, r.json()["choices"][0]["message"]["content"] if ok else r.text, dt,
                      r.json()["usage"]["completion_tokens"] if ok else 0)
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i, p, n) for i, (p, n) in enumerate(jobs)))
        return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--state-cache-mb", type=float, default=64.0, help="per worker (0: no saved states)")
    a = ap.parse_args()
    from edge_reft.models import default_model
    from edge_reft.patch import random_patch
    from edge_reft.reftfile import save_patch
    from edge_reft.runtime import Engine
    from edge_reft.services.serve.server import running_server

    model = str(default_model())
    folder = Path(tempfile.mkdtemp(prefix="serve-load-"))
    names = ["alice", "bob", "carol", "dave"]
    with Engine(model, n_ctx=1024) as solo:
        for i, (name, spec) in enumerate(zip(names, [(15, "l1", 4), (12, "l1", 4), (10, "f1+l1", 4),
                                                     (20, "all", 2)])):
            save_patch(random_patch(solo.base, [spec], scale=8.0, seed=i + 1), folder / f"{name}.reft")
        plain = [(PROMPTS[i % len(PROMPTS)], None) for i in range(a.requests)]
        mixed = [(PROMPTS[i % len(PROMPTS)], ([None] + names)[i % 5]) for i in range(a.requests)]
        want = {}
        for p, n in set(plain) | set(mixed):
            patch = solo.load_patch(folder / f"{n}.reft") if n else None
            want[(p, n)] = solo.generate(p, patch=patch, max_tokens=a.max_tokens, stream=False, cache="off").text
    phases = {"no patch": plain, "4 patches + none, mixed": mixed}
    got: dict[str, list] = {k: [] for k in phases}
    wall = dict.fromkeys(phases, 0.0)
    per = a.requests // a.rounds
    with running_server(model, folder, workers=a.workers, n_ctx=1024,
                        state_cache_mb=a.state_cache_mb) as url:
        asyncio.run(phase(url, plain[:a.clients], a.clients, a.max_tokens))  # warm-up
        for r in range(a.rounds):
            for label in (list(phases) if r % 2 == 0 else list(phases)[::-1]):
                jobs = phases[label][r * per:(r + 1) * per]
                res, dt = asyncio.run(phase(url, jobs, a.clients, a.max_tokens))
                got[label] += zip(jobs, res)
                wall[label] += dt
            print(f"  round {r + 1}/{a.rounds} done", file=sys.stderr)
    rows, tput = [], {}
    for label, done in got.items():
        errors = sum(not ok for _, (ok, *_) in done)
        leaks = sum(ok and text != want[j] for j, (ok, text, *_) in done)
        lat = sorted(dt for _, (*_, dt, _) in done)
        tokens = sum(n for _, (*_, n) in done)
        tput[label] = (len(done) / wall[label], tokens / wall[label])
        rows.append([label, len(done), errors, leaks, statistics.median(lat) * 1e3,
                     lat[int(0.95 * (len(lat) - 1))] * 1e3, *tput[label]])
    print(table(["phase", "requests", "errors", "leaks", "p50 ms", "p95 ms", "req/s", "tokens/s"], rows,
                title=f"\nedge-reft serve on 127.0.0.1: {a.clients} concurrent clients, {a.workers} workers, "
                      f"{a.max_tokens} new tokens a request, greedy, {a.rounds} interleaved rounds, "
                      f"saved states {a.state_cache_mb:g} MB a worker"))
    (rq0, tk0), (rq1, tk1) = tput.values()
    print(f"\nthroughput with patches / without: {tk1 / tk0:.3f} (tokens/s), {rq1 / rq0:.3f} (requests/s)")


if __name__ == "__main__":
    main()
