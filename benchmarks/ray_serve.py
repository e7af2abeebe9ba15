"""edge-reft on Ray Serve: 2 replicas against 1, many patches, no leaks.

    python benchmarks/ray_serve.py [--requests 200] [--patches 8] [--clients 8] [--rounds 2] [--configs 2x1,1x2]

A local Ray cluster on 127.0.0.1 (services/serve/ray_serve.py; no dashboard), the app
deployed with 2 replicas and with 1, in turn (ABBA over ``--rounds``, each deployment fresh,
its caches cold), ``--requests`` requests per configuration in all, every one with one of
``--patches`` patches.  Threads per replica: the cores // replicas (``--configs`` RxT, R
replicas of T threads, sets others).  Every greedy answer is
compared with the same request run alone (cache off) on an engine outside the cluster: a
cross-user leak would differ.  Printed per configuration: errors, leaks, the share of
requests that found their patch already held by the replica Ray chose (its response's
``x-edge-reft-patch-cache``), requests per replica, p50/p95 latency, requests and tokens per
second; then each configuration's throughput over the last one's.  The table also goes to results/ray_serve.txt.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shlex
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, table

PROMPTS = ["Name a fruit.", "What is the capital of Italy?", "Say something kind.", "Count to three.",
           "Give me a colour.", "What do cats eat?", "Describe rain in a few words.", "Name a planet."]
SPECS = [(15, "l1", 4), (12, "l1", 4), (10, "f1+l1", 4), (20, "all", 2), (6, "f2+l2", 4), (25, "l1", 2),
         (18, "f1", 4), (8, "all", 2)]


async def phase(url: str, jobs: list[tuple[str, str | None]], clients: int, max_tokens: int):
    """Each job as a chat request through ``clients`` concurrent connections: (ok, text or
    error, seconds, tokens, replica, cache) per job, and the wall time."""
    import httpx
    sem = asyncio.Semaphore(clients)
    out: list = [None] * len(jobs)
    async with httpx.AsyncClient(base_url=url, timeout=300) as c:
        async def one(i: int, prompt: str, patch: str | None):
            body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                    "temperature": 0, "patch": patch}
            if patch is None:
                del body["patch"]
            async with sem:
                t = time.perf_counter()
                r = await c.post("/v1/chat/completions", json=body)
                dt = time.perf_counter() - t
            ok = r.status_code == 200
            out[i] = (ok, r.json()["choices"][0]["message"]["content"] if ok else r.text[:200], dt,
                      r.json()["usage"]["completion_tokens"] if ok else 0,
                      r.headers.get("x-edge-reft-replica"), r.headers.get("x-edge-reft-patch-cache"))
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i, p, n) for i, (p, n) in enumerate(jobs)))
        return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200, help="per configuration, over all rounds")
    ap.add_argument("--patches", type=int, default=8)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2, help="ABBA: each configuration deployed once a round")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-patches", type=int, default=4, help="patches Ray's LRU holds per replica")
    ap.add_argument("--workers", type=int, default=1, help="engines per replica")
    ap.add_argument("--max-ongoing", type=int, default=None,
                    help="requests a replica takes at once (default 8 x workers); the rest wait in Ray's router")
    ap.add_argument("--slots", type=int, default=1, help="requests a worker decodes together (create_app's slots)")
    ap.add_argument("--configs", help="replicas x threads each, in order (default: 2xC/2,1xC for C cores)")
    a = ap.parse_args()
    from edge_reft.models import default_model
    from edge_reft.patch import random_patch
    from edge_reft.reftfile import save_patch
    from edge_reft.runtime import Engine
    from edge_reft.services.serve import ray_serve

    cpus = os.cpu_count() or 1
    spec = a.configs or f"2x{max(1, cpus // 2)},1x{cpus}"
    configs: dict[tuple[int, int], list] = {tuple(int(x) for x in c.split("x")): [] for c in spec.split(",")}
    model = str(default_model())
    folder = Path(tempfile.mkdtemp(prefix="ray-serve-"))
    names = [f"user{i}" for i in range(a.patches)]
    jobs = [(PROMPTS[(i // a.patches) % len(PROMPTS)], names[i % a.patches]) for i in range(a.requests)]
    with Engine(model, n_ctx=1024) as solo:
        for i, name in enumerate(names):
            save_patch(random_patch(solo.base, [SPECS[i % len(SPECS)]], scale=8.0, seed=i + 1),
                       folder / f"{name}.reft")
        want = {}
        for p, n in sorted(set(jobs)):
            want[(p, n)] = solo.generate(p, patch=solo.load_patch(folder / f"{n}.reft"),
                                         max_tokens=a.max_tokens, stream=False, cache="off").text
    print(f"  {len(want)} reference answers computed alone", file=sys.stderr)
    wall = dict.fromkeys(configs, 0.0)
    per = a.requests // a.rounds
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with ray_serve.local_cluster(port=port, num_cpus=cpus) as url:
        for r in range(a.rounds):
            for replicas, threads in (list(configs) if r % 2 == 0 else list(configs)[::-1]):
                ray_serve.run(ray_serve.application(model, str(folder), replicas=replicas, workers=a.workers,
                                                    threads=threads, max_patches=a.max_patches,
                                                    max_ongoing=a.max_ongoing, slots=a.slots, n_ctx=1024))
                warm = [(p, None) for p in PROMPTS[:a.clients]]  # no patch: Ray's LRUs stay cold
                asyncio.run(phase(url, warm, a.clients, a.max_tokens))
                part = jobs[r * per:(r + 1) * per]
                res, dt = asyncio.run(phase(url, part, a.clients, a.max_tokens))
                ray_serve.stop()  # the next shape starts on a free cluster, its caches cold
                configs[replicas, threads] += [(job, out, r) for job, out in zip(part, res)]
                wall[replicas, threads] += dt
                print(f"  round {r + 1}/{a.rounds}: {replicas} x {threads} done in {dt:.1f}s", file=sys.stderr)
    rows, tput = [], {}
    for (replicas, threads), done in configs.items():
        errors = sum(not ok for _, (ok, *_), _ in done)
        leaks = sum(ok and text != want[j] for j, (ok, text, *_), _ in done)
        held = sum(cache == "hit" for _, (*_, cache), _ in done)
        per_round = [collections.Counter(rep for _, (*_, rep, _), r in done if r == k) for k in range(a.rounds)]
        lat = sorted(dt for _, (_, _, dt, *_), _ in done)
        tokens = sum(n for _, (_, _, _, n, *_), _ in done)
        tput[replicas, threads] = tokens / wall[replicas, threads]
        rows.append([f"{replicas} x {threads} thread{'s' if threads > 1 else ''}", len(done), errors, leaks,
                     f"{held / len(done):.1%}", " + ".join("/".join(str(n) for _, n in c.most_common())
                                                           for c in per_round),
                     statistics.median(lat) * 1e3, lat[int(0.95 * (len(lat) - 1))] * 1e3,
                     len(done) / wall[replicas, threads], tput[replicas, threads]])
    title = (f"\nedge-reft on Ray Serve, 127.0.0.1, {cpus} cores: {a.patches} patches, {a.clients} concurrent "
             f"clients, {a.max_tokens} new tokens a request, greedy, {a.workers} worker(s) of {a.slots} slot(s) a "
             f"replica, at most {a.max_patches} patches held a replica, {a.max_ongoing or 8 * a.workers} requests "
             f"taken at once a replica, {a.rounds} interleaved rounds (each deployment fresh)")
    text = table(["replicas", "requests", "errors", "leaks", "held", "per replica, per round", "p50 ms", "p95 ms",
                  "req/s", "tokens/s"], rows, title=title)
    one = next((c for c in configs if c[0] == 1), list(configs)[-1])  # the first single-replica shape
    text += "\n\n" + "\n".join(f"throughput (tokens/s), {r} x {t} / {one[0]} x {one[1]}: "
                              f"{tput[r, t] / tput[one]:.3f}" for r, t in configs if (r, t) != one)
    print(text)
    out = ROOT / "benchmarks" / "results" / "ray_serve.txt"
    out.write_text(f"$ python {' '.join(shlex.quote(x) for x in ['ray_serve.py', *sys.argv[1:]])}\n{text}\n")


if __name__ == "__main__":
    main()
