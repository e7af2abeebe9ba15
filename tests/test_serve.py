"""The HTTP server: OpenAI-shaped answers, a patch per request, hostile requests, a small load."""
from __future__ import annotations

import asyncio
import json
import os
import shutil

import pytest

from edge_reft.patch import random_patch
from edge_reft.reftfile import save_patch
from hostile import CORPUS

PROMPTS = ["Name a fruit.", "What is the capital of Italy?", "Say something kind.", "Count to three."]


@pytest.fixture(scope="module")
def patch_dir(tmp_path_factory, engine_q4):
    d = tmp_path_factory.mktemp("patches")
    b = engine_q4.base
    for name, spec, seed in (("alice", (15, "l1", 4), 1), ("bob", (12, "l1", 4), 2),
                             ("carol", (10, "f1+l1", 4), 3), ("dave", (20, "all", 2), 4)):
        save_patch(random_patch(b, [spec], scale=8.0, seed=seed), d / f"{name}.reft")
    (d / "broken.reft").write_bytes(CORPUS["nan-weight"][0]())
    outside = tmp_path_factory.mktemp("outside") / "x.reft"
    shutil.copy(d / "alice.reft", outside)
    os.symlink(outside, d / "escape.reft")
    return d


@pytest.fixture(scope="module")
def client(patch_dir, smol_q4):
    from fastapi.testclient import TestClient
    from edge_reft.services.serve.server import create_app
    with TestClient(create_app(str(smol_q4), patch_dir, workers=2, n_ctx=1024)) as c:
        yield c


def solo(engine, prompt: str, patch_dir, name: str | None, n: int = 16) -> str:
    patch = engine.load_patch(patch_dir / f"{name}.reft") if name else None
    return engine.generate(prompt, patch=patch, max_tokens=n, temperature=0, stream=False, cache="off").text


def test_health_and_models(client):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["workers"] == 2 and len(h["fingerprint"]) == 64
    m = client.get("/v1/models").json()
    assert m["object"] == "list" and "alice" in m["data"][0]["patches"]


@pytest.mark.parametrize("name", [None, "alice", "carol", "dave"])
def test_chat_completion_equals_a_solo_run(client, engine_q4, patch_dir, name):
    body = {"messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 16, "temperature": 0}
    if name:
        body["patch"] = name
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion" and out["usage"]["completion_tokens"] > 0
    assert out["choices"][0]["message"]["content"] == solo(engine_q4, PROMPTS[0], patch_dir, name)


def test_streaming_matches_the_whole_answer(client):
    body = {"messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 20, "temperature": 0,
            "patch": "bob", "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    whole = client.post("/v1/chat/completions", json={**body, "stream": False}).json()
    assert text == whole["choices"][0]["message"]["content"] and chunks[-1]["choices"][0]["finish_reason"]


def test_text_completion_is_raw(client, engine_q4):
    prompt = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 8, "temperature": 0}).json()
    want = engine_q4.generate(prompt, raw=True, max_tokens=8, stream=False, cache="off").text
    assert r["object"] == "text_completion" and r["choices"][0]["text"] == want


@pytest.mark.parametrize("name,status,kind", [
    ("nobody", 404, "patch_not_found"), ("broken", 422, "invalid_patch"),
    ("../alice", 400, "invalid_patch_name"), ("/etc/passwd", 400, "invalid_patch_name"),
    ("a/b", 400, "invalid_patch_name"), (".hidden", 400, "invalid_patch_name"),
    ("escape", 403, "patch_outside_folder"),
])
def test_bad_patches_are_refused_and_service_goes_on(client, name, status, kind):
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                  "max_tokens": 2, "patch": name})
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == kind
    if kind == "invalid_patch":
        assert r.json()["error"]["param"] == "reft.0.weight"
    assert client.get("/health").status_code == 200
    ok = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                   "max_tokens": 2, "patch": "alice"})
    assert ok.status_code == 200


def test_oversized_body_is_413(client):
    r = client.post("/v1/completions", content=b'{"prompt": "' + b"x" * (2 << 20) + b'"}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"


@pytest.mark.parametrize("body", [{"messages": []}, {"messages": [{"role": "wizard", "content": "x"}]},
                                  {"messages": [{"role": "user", "content": "x"}], "max_tokens": -1},
                                  {"messages": [{"role": "user", "content": "x"}], "temperature": 9}])
def test_malformed_requests_are_422(client, body):
    assert client.post("/v1/chat/completions", json=body).status_code == 422


def test_a_changed_patch_file_is_reloaded(client, engine_q4, patch_dir):
    body = {"messages": [{"role": "user", "content": PROMPTS[2]}], "max_tokens": 12, "temperature": 0,
            "patch": "swap"}
    save_patch(random_patch(engine_q4.base, [(15, "l1", 4)], scale=8.0, seed=11), patch_dir / "swap.reft")
    first = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    save_patch(random_patch(engine_q4.base, [(15, "l1", 4)], scale=8.0, seed=12), patch_dir / "swap.reft")
    second = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    assert first != second and second == solo(engine_q4, PROMPTS[2], patch_dir, "swap", 12)


def test_concurrent_requests_never_leak_patches(patch_dir, smol_q4, engine_q4):
    """A real server on 127.0.0.1: 8 clients, 4 patches + none, 40 requests; every answer
    equals the same request run alone."""
    import httpx
    from edge_reft.services.serve.server import running_server
    names = [None, "alice", "bob", "carol", "dave"]
    jobs = [(PROMPTS[i % 4], names[i % 5]) for i in range(40)]
    want = {(p, n): solo(engine_q4, p, patch_dir, n, 12) for p, n in set(jobs)}

    async def run(url: str):
        sem = asyncio.Semaphore(8)
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            async def one(p, n):
                async with sem:
                    body = {"messages": [{"role": "user", "content": p}], "max_tokens": 12, "temperature": 0}
                    if n:
                        body["patch"] = n
                    r = await c.post("/v1/chat/completions", json=body)
                    return r.status_code, r.json()["choices"][0]["message"]["content"]
            return await asyncio.gather(*(one(p, n) for p, n in jobs))
    with running_server(smol_q4, patch_dir, workers=2) as url:
        results = asyncio.run(run(url))
    assert all(status == 200 for status, _ in results)
    leaks = [(j, got) for j, (_, got) in zip(jobs, results) if got != want[j]]
    assert not leaks, leaks[:3]
