"""`edge-reft serve` under load while clients abuse it (issue 14's "must show").

    python benchmarks/serve_abuse.py [--requests 200] [--clients 8] [--abandoners 20] [--fifo 5]

A real `edge-reft serve` process on 127.0.0.1 with 2 workers.  While 8 clients
send 200 greedy chat requests with mixed patches (4 patches and none), 20
clients keep opening streams and closing them after the first event, 5 keep
asking for a patch that is a FIFO, and a probe asks /health every 50 ms.
Printed: hung requests (no answer within --timeout; must be 0), errors, answers
that differ from the same request run alone (must be 0), the abusers' outcomes,
/health latency p50/p99 (must be < 100 ms), and whether every worker and
thread was free again afterwards.  Bounded: every request has a timeout.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import table

PROMPTS = ["Name a fruit.", "What is the capital of Italy?", "Say something kind.", "Count to three.",
           "Give me a colour.", "What do cats eat?", "Describe rain in a few words.", "Name a planet."]
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"


def start_server(model: str, folder: Path, workers: int) -> tuple[subprocess.Popen, int]:
    import httpx
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "edge_reft", "serve", model, "--patches", str(folder),
                             "--port", str(port), "--workers", str(workers), "--ctx", "1024"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc, port
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit("the server did not start")
        time.sleep(0.2)


def threads_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("Threads:")))


async def abandon_stream(port: int) -> str:
    """Open a stream, read up to its first event, close the socket: the client that leaves."""
    body = json.dumps({"prompt": COUNTING, "max_tokens": 200, "temperature": 0, "stream": True}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        got = b""
        while b"data: " not in got and b"\r\n\r\n{" not in got:
            chunk = await reader.read(4096)
            if not chunk:
                break
            got += chunk
        return got.split(b" ", 2)[1].decode() if got else "closed"
    finally:
        writer.close()


async def run(port: int, jobs, want, a) -> dict:
    import httpx
    url = f"http://127.0.0.1:{port}"
    stop = asyncio.Event()
    res: dict = {"answers": [], "health": [], "abandoned": {}, "fifo": {}}

    async with httpx.AsyncClient(base_url=url, timeout=a.timeout,
                                 limits=httpx.Limits(max_connections=100)) as c:
        sem = asyncio.Semaphore(a.clients)

        async def one(prompt: str, patch: str | None):
            body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": a.max_tokens,
                    "temperature": 0, **({"patch": patch} if patch else {})}
            async with sem:
                t = time.perf_counter()
                try:
                    r = await c.post("/v1/chat/completions", json=body)
                except httpx.TimeoutException:
                    return "hung", None, time.perf_counter() - t
                text = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else None
                return r.status_code, text, time.perf_counter() - t

        async def abuser(kind: str):
            while not stop.is_set():
                try:
                    if kind == "stream":
                        out = await asyncio.wait_for(abandon_stream(port), a.timeout)
                    else:
                        r = await c.post("/v1/chat/completions", json={
                            "messages": [{"role": "user", "content": "hi"}], "patch": "fifo"})
                        out = str(r.status_code)
                except (asyncio.TimeoutError, httpx.TimeoutException):
                    out = "hung"
                bucket = res["abandoned" if kind == "stream" else "fifo"]
                bucket[out] = bucket.get(out, 0) + 1
                await asyncio.sleep(a.pause)

        async def probe():
            while not stop.is_set():
                t = time.perf_counter()
                try:
                    await c.get("/health", timeout=10)
                    res["health"].append(time.perf_counter() - t)
                except httpx.TimeoutException:
                    res["health"].append(10.0)
                await asyncio.sleep(0.05)

        background = [asyncio.create_task(abuser("stream")) for _ in range(a.abandoners)]
        background += [asyncio.create_task(abuser("fifo")) for _ in range(a.fifo)]
        background.append(asyncio.create_task(probe()))
        t0 = time.perf_counter()
        res["answers"] = await asyncio.gather(*(one(p, n) for p, n in jobs))
        res["wall"] = time.perf_counter() - t0
        stop.set()
        await asyncio.gather(*background)
        deadline = time.time() + 60  # every worker free again once the abusers stopped
        while time.time() < deadline:
            h = (await c.get("/health")).json()
            if h["busy"] == 0 and h["waiting"] == 0:
                break
            await asyncio.sleep(0.2)
        res["after"], res["settle_s"] = h, 60 - (deadline - time.time())
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--abandoners", type=int, default=20)
    ap.add_argument("--fifo", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--pause", type=float, default=1.0, help="seconds each abuser waits between attempts")
    ap.add_argument("--timeout", type=float, default=300.0, help="a request with no answer by then is hung")
    a = ap.parse_args()
    from edge_reft.models import default_model
    from edge_reft.patch import random_patch
    from edge_reft.reftfile import save_patch
    from edge_reft.runtime import Engine

    model = str(default_model())
    folder = Path(tempfile.mkdtemp(prefix="serve-abuse-"))
    names = ["alice", "bob", "carol", "dave"]
    jobs = [(PROMPTS[i % len(PROMPTS)], ([None] + names)[i % 5]) for i in range(a.requests)]
    with Engine(model, n_ctx=1024) as solo:
        for i, (name, spec) in enumerate(zip(names, [(15, "l1", 4), (12, "l1", 4), (10, "f1+l1", 4),
                                                     (20, "all", 2)])):
            save_patch(random_patch(solo.base, [spec], scale=8.0, seed=i + 1), folder / f"{name}.reft")
        want = {}
        for p, n in set(jobs):
            patch = solo.load_patch(folder / f"{n}.reft") if n else None
            want[(p, n)] = solo.generate(messages=[{"role": "user", "content": p}], patch=patch,
                                         max_tokens=a.max_tokens, stream=False, cache="off").text
    os.mkfifo(folder / "fifo.reft")
    proc, port = start_server(model, folder, a.workers)
    try:
        threads0 = threads_of(proc.pid)
        res = asyncio.run(run(port, jobs, want, a))
        threads1 = threads_of(proc.pid)
    finally:
        proc.terminate()
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = "ignored SIGTERM"
    answers = res["answers"]
    hung = sum(s == "hung" for s, _, _ in answers)
    errors = sum(s not in (200, "hung") for s, _, _ in answers)
    differ = sum(s == 200 and text != want[j] for j, (s, text, _) in zip(jobs, answers))
    lat = sorted(dt for s, _, dt in answers if s == 200)
    health = sorted(res["health"])
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3
    print(table(["requests", "hung", "errors", "differ from alone", "p50 ms", "p95 ms", "wall s"],
                [[len(answers), hung, errors, differ, statistics.median(lat) * 1e3, pct(lat, 0.95),
                  res["wall"]]],
                title=f"\nedge-reft serve, {a.workers} workers: {a.clients} clients, {a.requests} chat requests "
                      f"(4 patches + none, mixed, {a.max_tokens} tokens, greedy), while {a.abandoners} clients "
                      f"abandon streams and {a.fifo} ask for a FIFO patch (each every {a.pause:g} s)"))
    print(table(["probe", "count", "p50 ms", "p99 ms", "max ms"],
                [["/health every 50 ms", len(health), pct(health, 0.5), pct(health, 0.99), health[-1] * 1e3]]))
    print(f"\nabandoned streams (status seen before leaving): {res['abandoned']}")
    print(f"FIFO patch requests (status): {res['fifo']}")
    print(f"after the run: {res['after']['busy']} busy, {res['after']['waiting']} waiting "
          f"(settled in {res['settle_s']:.1f} s); server threads {threads0} before, {threads1} after; "
          f"SIGTERM exit status {rc}")
    ok = hung == 0 and errors == 0 and differ == 0 and pct(health, 0.99) < 100 and res["fifo"].get("hung", 0) == 0
    print(f"\nverdict: {'PASS' if ok else 'FAIL'} (0 hung, 0 errors, 0 differing, /health p99 < 100 ms)")


if __name__ == "__main__":
    main()
