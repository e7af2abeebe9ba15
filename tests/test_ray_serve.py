"""edge-reft on Ray Serve (services/serve/ray_serve.py): a local cluster of 2 replicas on
127.0.0.1 answers as the plain server does.  Greedy answers equal a fresh engine's, errors are
the plain server's byte for byte, a patch's requests go to the replica holding it, streams
arrive as server-sent events; and the plain server never imports ray.

The Ray tests are slow (a cluster starts) and skip when ray[serve] is not installed (the
optional [ray] extra)."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

PATCHES = {"alice": (15, "l1", 4), "bob": (12, "f1+l1", 4), "carol": (20, "all", 2)}
PROMPTS = ["Name a fruit.", "What is the capital of Italy?", "Say something kind."]
TOKENS = 12


def test_the_plain_server_never_imports_ray():
    code = ("import sys, edge_reft.services.serve.server, edge_reft.services.cli.serve; "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, smol_q4):
    """(Ray URL, plain server URL, expected answers, patch folder): 2 replicas of 1 worker and 1 thread each,
    at most 2 of the 3 patches held per replica; Serve and Ray shut down whatever happens."""
    # first, so that it imports ray itself (with the switch that keeps the cluster on 127.0.0.1)
    ray_serve = pytest.importorskip("edge_reft.services.serve.ray_serve")
    import ray

    from edge_reft.patch import random_patch
    from edge_reft.reftfile import save_patch
    from edge_reft.runtime import Engine
    from edge_reft.services.serve.server import running_server

    folder = tmp_path_factory.mktemp("ray-patches")
    want = {}
    with Engine(smol_q4, n_ctx=1024) as solo:
        for i, (name, spec) in enumerate(PATCHES.items()):
            save_patch(random_patch(solo.base, [spec], scale=8.0, seed=i + 1), folder / f"{name}.reft")
        for name in [None, *PATCHES]:
            patch = solo.load_patch(folder / f"{name}.reft") if name else None
            for p in PROMPTS:
                want[(p, name)] = solo.generate(p, patch=patch, max_tokens=TOKENS, stream=False, cache="off").text
    app = ray_serve.application(str(smol_q4), str(folder), replicas=2, workers=1, threads=1, max_patches=2,
                                n_ctx=1024)
    try:
        with ray_serve.local_cluster(port=_free_port(), num_cpus=2) as url:
            ray_serve.run(app)
            with running_server(smol_q4, folder, workers=1, n_ctx=1024) as plain:
                yield url, plain, want, folder
    finally:
        assert not ray.is_initialized()


def _body(prompt: str, name: str | None, **extra) -> dict:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": TOKENS, "temperature": 0, **extra}
    if name:
        body["patch"] = name
    return body


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_answers_through_ray_equal_a_fresh_engine(cluster):
    import httpx
    url, _, want, _ = cluster
    seen = set()
    with httpx.Client(base_url=url, timeout=120) as c:
        for (prompt, name), text in want.items():
            r = c.post("/v1/chat/completions", json=_body(prompt, name))
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == text, (prompt, name)
            seen.add(r.headers["x-edge-reft-replica"])
            assert (r.headers.get("x-edge-reft-patch-cache") in ("hit", "miss")) == bool(name)
    assert len(seen) == 2, f"every request went to one replica: {seen}"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_patch_goes_to_the_replica_holding_it(cluster):
    import httpx
    url, _, want, _ = cluster
    with httpx.Client(base_url=url, timeout=120) as c:
        first = c.post("/v1/chat/completions", json=_body(PROMPTS[0], "bob"))
        assert first.status_code == 200, first.text
        time.sleep(2)  # a replica reports what it holds every 0.1 s; routers hear it soon after
        later = [c.post("/v1/chat/completions", json=_body(p, "bob")) for p in PROMPTS]
    assert [r.headers.get("x-edge-reft-patch-cache") for r in later] == ["hit"] * len(PROMPTS)
    assert [r.json()["choices"][0]["message"]["content"] for r in later] == [want[(p, "bob")] for p in PROMPTS]


BAD = [
    ("/v1/chat/completions", {"model": "nobody", "messages": [{"role": "user", "content": "Hi"}]}),
    ("/v1/chat/completions", {"patch": "nobody", "messages": [{"role": "user", "content": "Hi"}]}),
    ("/v1/chat/completions", {"patch": "../alice", "messages": [{"role": "user", "content": "Hi"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "colour": "red"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "n": 2, "patch": "alice"}),
    ("/v1/completions", {"prompt": "Hi", "model": "alice", "patch": "bob"}),
    ("/v1/completions", {"prompt": ""}),
]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("path,body", BAD, ids=[f"{p.split('/')[-1]}-{i}" for i, (p, _) in enumerate(BAD)])
def test_errors_are_the_plain_servers(cluster, path, body):
    import httpx
    url, plain, _, _ = cluster
    got = httpx.post(url + path, json=body, timeout=120)
    ref = httpx.post(plain + path, json=body, timeout=120)
    assert got.status_code == ref.status_code and got.status_code in (400, 403, 404, 422)
    assert got.json() == ref.json()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_unknown_patch_is_404_through_ray(cluster):
    import httpx
    url, _, _, _ = cluster
    r = httpx.post(url + "/v1/chat/completions", json=_body("Hi", None, model="nobody"), timeout=120)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert "x-edge-reft-patch-cache" not in r.headers  # an unknown name never enters a replica's LRU


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_stream_arrives_as_server_sent_events(cluster):
    import httpx
    url, _, want, _ = cluster
    pieces, done = [], False
    with httpx.stream("POST", url + "/v1/chat/completions", json=_body(PROMPTS[1], "carol", stream=True),
                      timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                pieces.append(json.loads(line[6:])["choices"][0]["delta"].get("content", ""))
    assert done and "".join(pieces) == want[(PROMPTS[1], "carol")]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_models_and_health_through_ray(cluster):
    import httpx
    url, plain, _, _ = cluster
    got, ref = httpx.get(url + "/v1/models", timeout=60).json(), httpx.get(plain + "/v1/models", timeout=60).json()
    assert [m["id"] for m in got["data"]] == [m["id"] for m in ref["data"]]
    assert [m["id"] for m in got["data"]][1:] == sorted(PATCHES)
    assert httpx.get(url + "/health", timeout=60).json()["status"] == "ok"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_full_queue_is_503_as_the_plain_servers(cluster, smol_q4):
    """Last: it redeploys the app with room for 1 request a replica and 1 waiting in Ray's router;
    more are refused as the plain server refuses them when its queue is full."""
    import asyncio

    import httpx

    from edge_reft.services.serve import ray_serve
    url, _, _, folder = cluster
    ray_serve.stop()  # a rolling update would wait for CPUs the old replicas hold
    ray_serve.run(ray_serve.application(str(smol_q4), str(folder), replicas=2, workers=1, threads=1,
                                        max_ongoing=1, max_queue=1, n_ctx=1024))

    async def burst():
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            body = _body(PROMPTS[0], "alice", max_tokens=48)
            return await asyncio.gather(*(c.post("/v1/chat/completions", json=body) for _ in range(8)))
    got = asyncio.run(burst())
    codes = sorted(r.status_code for r in got)
    # Ray counts the requests not yet given a replica at that instant: a burst is mostly refused
    assert 200 in codes and 503 in codes and set(codes) <= {200, 503}, codes
    refused = next(r for r in got if r.status_code == 503)
    assert refused.json()["error"]["code"] == "overloaded" and refused.headers["retry-after"] == "1"
    assert "--queue 1" in refused.json()["error"]["message"]
