"""`edge-reft serve` driven by the official `openai` Python SDK, as an OpenAI client would use
it: a real server on 127.0.0.1, the real model, real patches.  Every answer is checked
against the same request run on an engine alone, and every refusal against OpenAI's
error shape (the SDK's exception class, ``.code``, ``.param``)."""
from __future__ import annotations

import subprocess
import sys
import socket

import pytest

from edge_reft.patch import random_patch
from edge_reft.reftfile import save_patch

openai = pytest.importorskip("openai")

Q = [{"role": "user", "content": "Name a fruit."}]


@pytest.fixture(scope="module")
def patch_dir(tmp_path_factory, engine_q4):
    d = tmp_path_factory.mktemp("sdk-patches")
    b = engine_q4.base
    for name, spec, seed in (("alice", (15, "l1", 4), 1), ("bob", (12, "all", 2), 2)):
        save_patch(random_patch(b, [spec], scale=8.0, seed=seed), d / f"{name}.reft")
    (d / "broken.reft").write_bytes(b"GGUF not really")
    return d


@pytest.fixture(scope="module")
def server(patch_dir, smol_q4):
    from edge_reft.services.serve.server import running_server
    with running_server(str(smol_q4), patch_dir, workers=1, n_ctx=1024, keys=None) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


def solo(engine, patch_dir, names, n=12, messages=Q, **kw):
    patches = [engine.load_patch(patch_dir / f"{x}.reft") for x in names]
    return engine.generate(messages=messages, patch=patches, max_tokens=n, stream=False, cache="off",
                           **{"temperature": 0, **kw})


def base_id(client) -> str:
    return client.models.list().data[0].id


def test_models_list_and_retrieve(client):
    models = client.models.list().data
    base = models[0]
    assert " " not in base.id and base.created > 0 and base.owned_by == "edge-reft"
    ids = [m.id for m in models]
    assert {"alice", "bob", "broken"} <= set(ids)  # files by name; a broken one fails on use (422)
    assert client.models.retrieve(base.id).id == base.id
    alice = client.models.retrieve("alice")
    assert alice.id == "alice" and alice.created > 0
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("nobody")
    assert e.value.code == "model_not_found"


@pytest.mark.parametrize("how", ["name", "base+name", "patch"])
def test_model_selects_the_patch(client, engine_q4, patch_dir, how):
    model = {"name": "alice", "base+name": f"{base_id(client)}+alice", "patch": base_id(client)}[how]
    extra = {"extra_body": {"patch": "alice"}} if how == "patch" else {}
    r = client.chat.completions.create(model=model, messages=Q, max_tokens=12, temperature=0, **extra)
    assert r.choices[0].message.content == solo(engine_q4, patch_dir, ["alice"]).text
    assert r.model == model
    plain = client.chat.completions.create(model=base_id(client), messages=Q, max_tokens=12, temperature=0)
    assert plain.choices[0].message.content == solo(engine_q4, patch_dir, []).text
    assert plain.choices[0].message.content != r.choices[0].message.content


def test_stacked_patches_over_http(client, engine_q4, patch_dir):
    r = client.chat.completions.create(model="alice+bob", messages=Q, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == solo(engine_q4, patch_dir, ["alice", "bob"]).text


def test_stream_with_usage(client, engine_q4, patch_dir):
    chunks = list(client.chat.completions.create(model="alice", messages=Q, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    want = solo(engine_q4, patch_dir, ["alice"])
    assert text == want.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.tokens)
    assert chunks[-1].usage.prompt_tokens == len(want.prompt_tokens)
    assert all(c.usage is None for c in chunks[:-1])


def test_content_parts_developer_role_and_max_completion_tokens(client, engine_q4, patch_dir):
    msgs = [{"role": "developer", "content": "Answer in one word."},
            {"role": "user", "content": [{"type": "text", "text": "Name a "}, {"type": "text", "text": "fruit."}]}]
    r = client.chat.completions.create(model="alice", messages=msgs, max_completion_tokens=5, temperature=0)
    want = solo(engine_q4, patch_dir, ["alice"], n=5, messages=[
        {"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Name a fruit."}])
    assert r.choices[0].message.content == want.text
    assert r.usage.completion_tokens == len(want.tokens) <= 5


def test_seed_stop_and_penalties_reach_the_sampler(client, engine_q4, patch_dir):
    kw = dict(temperature=0.9, seed=7, frequency_penalty=0.8, presence_penalty=0.5)
    a = client.chat.completions.create(model="alice", messages=Q, max_tokens=12, stop=["\n"], **kw)
    b = client.chat.completions.create(model="alice", messages=Q, max_tokens=12, stop=["\n"], **kw)
    want = solo(engine_q4, patch_dir, ["alice"], stop=["\n"], **kw)
    assert a.choices[0].message.content == b.choices[0].message.content == want.text


def test_completions_endpoint(client, engine_q4, patch_dir):
    r = client.completions.create(model="alice", prompt="The capital of France is", max_tokens=6, temperature=0)
    want = engine_q4.generate("The capital of France is", raw=True, patch=engine_q4.load_patch(
        patch_dir / "alice.reft"), max_tokens=6, temperature=0, stream=False, cache="off")
    assert r.choices[0].text == want.text


@pytest.mark.parametrize("kw,param", [
    (dict(n=2), "n"), (dict(logprobs=True), "logprobs"), (dict(logit_bias={"1": 5}), "logit_bias"),
    (dict(response_format={"type": "json_object"}), "response_format"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tools"),
])
def test_unsupported_parameters_are_a_clear_400(client, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="alice", messages=Q, max_tokens=2, **kw)
    assert e.value.code == "unsupported_parameter" and e.value.param == param
    assert "supported" in e.value.message


def test_errors_have_openai_shape(client, patch_dir):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nobody", messages=Q, max_tokens=2)
    assert e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.chat.completions.create(model="broken", messages=Q, max_tokens=2)
    assert e.value.code == "invalid_patch" and str(patch_dir) not in e.value.message
    with pytest.raises(openai.UnprocessableEntityError) as e:  # an unknown field, by name
        client.chat.completions.create(model="alice", messages=Q, max_tokens=2, extra_body={"frobnicate": 1})
    assert "frobnicate" in e.value.message and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="alice", max_tokens=2,
                                       messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])


def test_curl_form_content_type_is_read_as_json(server):
    """README's curl -d sends application/x-www-form-urlencoded."""
    import httpx
    r = httpx.post(server + "/v1/chat/completions", content=b'{"messages":[{"role":"user","content":"Hi"}],'
                   b'"max_tokens":3,"model":"alice"}', headers={"content-type": "application/x-www-form-urlencoded"},
                   timeout=60)
    assert r.status_code == 200, r.text


def test_api_key_and_busy_port(smol_q4, patch_dir, tmp_path):
    """serve --api-key: the SDK's key is required; a busy port is refused before loading."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "edge_reft", "serve", str(smol_q4), "--patches",
                            str(patch_dir), "--port", str(port)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and f"--port {port}: cannot listen there" in r.stderr
    assert "serving on" not in r.stderr
    from edge_reft.services.serve.access import AccessKeys
    from edge_reft.services.serve.server import running_server
    with running_server(str(smol_q4), patch_dir, workers=1, n_ctx=512,
                        keys=AccessKeys.single("sk-local-123456")) as url:
        good = openai.OpenAI(base_url=url + "/v1", api_key="sk-local-123456", max_retries=0)
        assert good.chat.completions.create(model="alice", messages=Q, max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong-0000000", max_retries=0).models.list()
