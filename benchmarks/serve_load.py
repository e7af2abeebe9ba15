"""Serving at scale: `edge-reft serve` against llama.cpp's own server, side by side.

    python benchmarks/serve_load.py [--clients 8,32] [--requests 96] [--max-tokens 32] [--rounds 2]
    python benchmarks/serve_load.py --many 1000 --many-requests 2000   # the 1,000-patch run

Real servers on 127.0.0.1, all started before the first request and left idle
while another is measured, the same model (the embedded SmolLM2 Q4_1), the same
chat requests, greedy:

- llama-server: llama.cpp's own server built from the pinned llama-cpp-python
  sdist (benchmarks/llama_server.py), ``-np C -cb``, no patches: the anchor;
- edge-reft, no patches: ``--slots C``;
- edge-reft, mixed: ``--slots C``, every request a different patch (l1, f1+l1 and
  all-positions patches in turn);
- edge-reft, per-context pool: ``--slots 1 --workers 2`` (how `serve` ran before
  batching: a context per request), every request a different patch.
- with ``--also ARGS`` (repeatable): edge-reft with those flags, a patch each
  (several batching workers, for instance, on a GPU).

With ``--ngl N`` every server runs N layers on the GPU (a GPU build of both:
benchmarks/gpu/serve.sh).

``--prompts cycle`` (the default) sends the 8 chat prompts above in turn, so a
server may answer a prompt's head from cells another request left;
``--prompts unique`` sends every request a prompt of its own (a reply asked to a
real SST-2 review, 20-60 tokens), as thousands of users would: no server
can reuse another request's prompt beyond the chat template.

For each number of concurrent clients C the four run in interleaved rounds
(ABCD, DCBA, ...).  Every edge-reft answer is compared with the same request run
alone on a fresh one-sequence engine (cache off); a cross-user leak differs.
With ``--many N`` one server holds N distinct patches and takes
``--many-requests`` requests from 32 clients: errors, leaks, throughput,
latency and the server's RSS at the end.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

from common import table

PROMPTS = ["Name a fruit.", "What is the capital of Italy?", "Say something kind.", "Count to three.",
           "Give me a colour.", "What do cats eat?", "Describe rain in a few words.", "Name a planet."]
SPECS = [(15, "l1", 4), (10, "f1+l1", 4), (20, "all", 2), (12, "l1", 4), (5, "f2+l2", 4)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def edge_server(model: str, folder: Path, *args: str):
    """`edge-reft serve` as its own process; yields (url, pid)."""
    import httpx
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edge_reft", "serve", model, "--patches", str(folder),
                             "--port", str(port), "--ctx", "512", "--quiet", "--queue", "4096", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 180
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"edge-reft serve {' '.join(args)} did not start: "
                                 f"{proc.stderr.read().decode()[-2000:] if proc.poll() is not None else 'timeout'}")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}", proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("VmRSS:"))) / 1024


async def load(url: str, jobs: list[tuple[str, str | None]], clients: int, max_tokens: int):
    """Every job as a chat request, ``clients`` at a time: [(ok, text, seconds, tokens)], wall."""
    import httpx
    sem = asyncio.Semaphore(clients)
    out: list = [None] * len(jobs)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as c:
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
            j = r.json() if ok else None
            out[i] = (ok, j["choices"][0]["message"]["content"] if ok else r.text[:200], dt,
                      j["usage"]["completion_tokens"] if ok else 0)
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i, p, n) for i, (p, n) in enumerate(jobs)))
        return out, time.perf_counter() - t0


def prompt_list(kind: str, n: int) -> list[str]:
    """``n`` chat prompts: the 8 above in turn, or ``n`` distinct replies to SST-2 reviews."""
    if kind == "cycle":
        return [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    from edge_reft.tasks import sst2
    reviews = list(dict.fromkeys(s for half in ("test", "train") for s, _ in sst2(half)))  # distinct, in order
    if len(reviews) < n:
        raise SystemExit(f"--prompts unique: SST-2 holds {len(reviews)} reviews, {n} requested")
    return [f"Answer this movie review in two sentences: {s}" for s in reviews[:n]]


def make_patches(base, folder: Path, n: int, specs=SPECS) -> list[str]:
    from edge_reft.patch import random_patch
    from edge_reft.reftfile import save_patch
    names = []
    for i in range(n):
        name = f"user{i:04d}"
        save_patch(random_patch(base, [specs[i % len(specs)]], scale=8.0, seed=1000 + i), folder / f"{name}.reft")
        names.append(name)
    return names


def expected(model: str, folder: Path, jobs: set[tuple[str, str | None]], max_tokens: int,
             ngl: int = 0) -> dict | None:
    """Each (prompt, patch) run alone on a fresh one-sequence engine, cache off.  None with
    layers on a GPU: there a batch changes the kernels, so answers differ from alone even
    without patches (benchmarks/results/batch_decode_h200.txt) and this is no leak test; the
    exact one is the CPU's."""
    if ngl:
        return None
    from edge_reft.runtime import Engine
    with Engine(model, n_ctx=512) as solo:
        return {(p, n): solo.generate(p, patch=folder / f"{n}.reft" if n else None, max_tokens=max_tokens,
                                      stream=False, cache="off").text for p, n in sorted(jobs, key=str)}


def summarize(label: str, done: list, wall: float, want: dict | None) -> list:
    errors = sum(not ok for _, (ok, *_) in done)
    leaks = "-" if want is None else sum(ok and text != want[j] for j, (ok, text, *_) in done)
    lat = sorted(dt for _, (_, _, dt, _) in done)
    tokens = sum(n for _, (*_, n) in done)
    return [label, len(done), errors, leaks, statistics.median(lat) * 1e3, lat[int(0.95 * (len(lat) - 1))] * 1e3,
            len(done) / wall, tokens / wall]


# edge-reft's engine runs attention without flash attention on a CPU (its rounding matches the
# reference); llama-server's default (auto) would turn it on.  The same kernels for both:
LLAMA_EXTRA = ("--flash-attn", "off")
POOL = "edge-reft per-context pool, a patch each"
HEAD = ["server", "requests", "errors", "leaks", "p50 ms", "p95 ms", "req/s", "tokens/s"]


def compare(a, model: str, folder: Path, names: list[str]) -> None:
    import llama_server
    from edge_reft.runtime.llamacpp.repack import choose_repack
    repack = choose_repack(None)[0]
    # on a GPU both run llama.cpp's default attention (flash attention auto), every layer there
    extra = ("-ngl", str(a.ngl)) if a.ngl else LLAMA_EXTRA
    gpu = ("--ngl", str(a.ngl)) if a.ngl else ()
    prompts = prompt_list(a.prompts, a.requests)
    plain = [(p, None) for p in prompts]
    mixed = [(p, names[i % len(names)]) for i, p in enumerate(prompts)]
    want = expected(model, folder, set(plain) | set(mixed), a.max_tokens, a.ngl)  # the same for every C
    for clients in a.clients:
        with ExitStack() as stack:
            anchor = stack.enter_context(llama_server.start(model, clients, ctx_per_slot=512, repack=repack,
                                                            extra=extra))
            servers = {
                "llama-server -np C -cb": (anchor, plain, None),
                "edge-reft, no patches": (stack.enter_context(edge_server(
                    model, folder, "--slots", str(clients), *gpu))[0], plain, want),
                "edge-reft, a patch each": (stack.enter_context(edge_server(
                    model, folder, "--slots", str(clients), *gpu))[0], mixed, want),
                POOL: (stack.enter_context(edge_server(
                    model, folder, "--slots", "1", "--workers", "2", *gpu))[0], mixed, want),
            }
            for args in a.also:  # more edge-reft configurations, a patch each
                servers[f"edge-reft {args}, a patch each"] = (stack.enter_context(edge_server(
                    model, folder, *shlex.split(args), *gpu))[0], mixed, want)
            got = {k: [] for k in servers}
            wall = dict.fromkeys(servers, 0.0)
            for url, jobs, _ in servers.values():  # warm-up
                asyncio.run(load(url, jobs[:clients], clients, 4))
            per = a.requests // a.rounds
            for r in range(a.rounds):
                for label in (list(servers) if r % 2 == 0 else list(servers)[::-1]):
                    url, jobs, _ = servers[label]
                    part = jobs[r * per:(r + 1) * per]
                    res, dt = asyncio.run(load(url, part, clients, a.max_tokens))
                    got[label] += zip(part, res)
                    wall[label] += dt
                print(f"  {clients} clients: round {r + 1}/{a.rounds} done", file=sys.stderr)
        rows = [summarize(k, got[k], wall[k], servers[k][2]) for k in servers]
        anchor_tps = rows[0][-1]
        for row in rows:
            row.append(row[-1] / anchor_tps)
        pool_tps = dict(zip(servers, rows))[POOL][-2]
        print(table(HEAD + ["x llama-server"], rows,
                    title=f"\n{clients} concurrent clients, {a.requests} chat requests each ({a.prompts} prompts), "
                          f"{a.max_tokens} new "
                          f"tokens at most, greedy, {a.rounds} interleaved rounds; {os.cpu_count()} cores; "
                          f"{llama_server.note(clients, 512, repack=repack, extra=extra)}"
                          + ("; leaks not checked on a GPU (a batch changes its kernels)" if a.ngl else "")))
        for label, row in zip(servers, rows):
            if label != POOL and servers[label][1] is mixed:
                print(f"{label} / per-context pool: {row[-2] / pool_tps:.2f}x tokens/s")


def many(a, model: str, folder: Path, names: list[str]) -> None:
    jobs = [(PROMPTS[i % len(PROMPTS)], names[i % len(names)]) for i in range(a.many_requests)]
    t = time.perf_counter()
    want = expected(model, folder, set(jobs), a.max_tokens)
    print(f"  {len(want)} solo answers in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    with edge_server(model, folder, "--slots", "32") as (url, pid):
        res, wall = asyncio.run(load(url, jobs, 32, a.max_tokens))
        rss = rss_mib(pid)
    row = summarize(f"{len(names)} patches, 32 slots", list(zip(jobs, res)), wall, want)
    print(table(HEAD + ["RSS MiB"], [row + [rss]],
                title=f"\n{a.many_requests} chat requests from 32 concurrent clients over {len(names)} distinct "
                      f"patches (l1, f1+l1, all, l1, f2+l2 in turn), {a.max_tokens} new tokens at most, greedy"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[8, 32])
    ap.add_argument("--requests", type=int, default=96, help="per server and number of clients")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--many", type=int, default=0, help="the many-patch run instead: this many patches")
    ap.add_argument("--many-requests", type=int, default=2000)
    ap.add_argument("--prompts", choices=("cycle", "unique"), default="cycle",
                    help="the 8 prompts in turn, or a distinct real prompt (an SST-2 review) for every request")
    ap.add_argument("--l1-only", action="store_true",
                    help="every patch edits the last prompt token only (l1): users share the prompt's cells")
    ap.add_argument("--also", action="append", default=[], metavar="ARGS",
                    help='another edge-reft server, a patch each, with these flags (e.g. "--workers 2 --slots 4")')
    ap.add_argument("--model", help="a .gguf (default: the embedded SmolLM2)")
    ap.add_argument("--ngl", type=int, default=0,
                    help="layers on the GPU, for both servers (a GPU build: benchmarks/gpu/serve.sh)")
    a = ap.parse_args()
    from edge_reft.fingerprint import from_gguf
    from edge_reft.models import default_model
    model = a.model or str(default_model())
    folder = Path(tempfile.mkdtemp(prefix="serve-load-"))
    specs = [s for s in SPECS if s[1] == "l1"] if a.l1_only else SPECS
    names = make_patches(from_gguf(model), folder, a.many or max(a.requests, 8), specs)
    print(f"$ python benchmarks/serve_load.py {' '.join(sys.argv[1:])}")
    (many if a.many else compare)(a, model, folder, names)


if __name__ == "__main__":
    main()
