"""Many patches: a registry manifest on a real HTTP server (127.0.0.1), pulled once and
verified, a bounded LRU of bound patch sets with pins, and the server serving on when
the registry is down or lies."""
from __future__ import annotations

import hashlib
import http.server
import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

from edge_reft.errors import ReftError
from edge_reft.fingerprint import from_gguf
from edge_reft.models import default_model
from edge_reft.patch import random_patch
from edge_reft.reftfile import save_patch
from edge_reft.services.serve.patchstore import PatchNotFound, PatchStore
from edge_reft.services.serve.registry import PatchRefused, Registry, RegistryUnavailable
from hostile import CORPUS

SPECS = {"alice": (15, "l1", 4), "bob": (12, "f1+l1", 4), "carol": (10, "l1", 4), "dave": (20, "all", 2)}


class Site:
    """A registry on 127.0.0.1: ``files`` by path, every GET counted, ``status`` to fail them all."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.gets, self.status = files, Counter(), None
        site = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                site.gets[self.path] += 1
                data = site.files.get(self.path)
                if site.status or data is None:
                    self.send_error(site.status or 404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def publish(self, **entries: dict) -> None:
        self.files["/manifest.json"] = json.dumps({"patches": entries}).encode()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def site(files: dict[str, bytes]):
    s = Site(dict(files))
    try:
        yield s
    finally:
        s.close()


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, bytes]:
    """The bytes of each test patch, made for the default model's base."""
    base, d = from_gguf(default_model()), tmp_path_factory.mktemp("made")
    return {name: save_patch(random_patch(base, [spec], scale=8.0, seed=i), d / f"{name}.reft").read_bytes()
            for i, (name, spec) in enumerate(SPECS.items())}


def entry(made: dict[str, bytes], name: str, **over) -> dict:
    return {"url": f"{name}.reft", "sha256": sha(made[name]), **over}


@pytest.fixture
def remote(made):
    """A registry serving alice and bob (relative URLs) from its own manifest."""
    with site({f"/{n}.reft": made[n] for n in ("alice", "bob")}) as s:
        s.publish(alice=entry(made, "alice"), bob=entry(made, "bob"))
        yield s


def store_of(folder, engine, url=None, ttl=300.0, cache=None, **kw) -> PatchStore:
    reg = url and Registry(f"{url}/manifest.json", cache or folder / ".registry", ttl, base=engine.base)
    return PatchStore(folder, engine.patch_set, registry=reg or None, **kw)


def test_a_remote_patch_is_pulled_once_then_served_from_the_cache(remote, made, engine_q4, tmp_path):
    store = store_of(tmp_path, engine_q4, remote.url)
    with ThreadPoolExecutor(8) as ex:  # many requests for one name not yet pulled: one download
        sets = list(ex.map(lambda _: store.get("alice"), range(16)))
    assert all(s is sets[0] for s in sets) and store.loads == 1
    assert remote.gets["/alice.reft"] == 1 and remote.gets["/manifest.json"] == 1
    assert (tmp_path / ".registry" / "alice.reft").read_bytes() == made["alice"]
    local = engine_q4.patch_set(engine_q4.load_patch(tmp_path / ".registry" / "alice.reft"))
    assert sets[0].key == local.key
    assert store.get("bob") is store.get("bob") and remote.gets["/bob.reft"] == 1
    # a restarted server finds the verified file in its cache folder: no second download
    again = store_of(tmp_path, engine_q4, remote.url)
    assert again.get("alice").key == local.key and remote.gets["/alice.reft"] == 1


def test_the_folder_wins_over_the_registry(remote, made, engine_q4, tmp_path):
    (tmp_path / "alice.reft").write_bytes(made["carol"])
    store = store_of(tmp_path, engine_q4, remote.url)
    carol = engine_q4.patch_set(engine_q4.load_patch(tmp_path / "alice.reft"))
    assert store.get("alice").key == carol.key and sum(remote.gets.values()) == 0


@pytest.mark.parametrize("field", ["sha256", "size"])
def test_a_file_that_is_not_the_manifests_is_refused_and_nothing_is_kept(remote, made, engine_q4, tmp_path,
                                                                         field):
    lie = {"sha256": sha(made["bob"])} if field == "sha256" else {"size": len(made["alice"]) - 1}
    remote.publish(alice=entry(made, "alice", **lie))
    store = store_of(tmp_path, engine_q4, remote.url)
    for _ in range(3):  # refused once, remembered: the registry is not asked again
        with pytest.raises(PatchRefused, match=f"patch 'alice': refused.*{'sha256' if field == 'sha256' else 'limit'}"):
            store.get("alice")
    assert remote.gets["/alice.reft"] == 1
    assert not [p.name for p in (tmp_path / ".registry").iterdir() if ".reft" in p.name and "lock" not in p.name]


def test_a_down_registry_fails_remote_names_and_local_and_cached_patches_serve_on(remote, made, engine_q4,
                                                                                 tmp_path):
    (tmp_path / "local.reft").write_bytes(made["carol"])
    store = store_of(tmp_path, engine_q4, remote.url, ttl=0.5)
    alice = store.get("alice")
    remote.status = 503
    time.sleep(0.6)  # the manifest is stale: the refresh fails, the last good one answers
    assert store.get("alice") is alice and store.get("local")
    with pytest.raises(RegistryUnavailable, match="patch 'bob': the patch registry is unavailable"):
        store.get("bob")
    asked = sum(remote.gets.values())
    with pytest.raises(RegistryUnavailable) as e:  # remembered for the retry interval: no new request
        store.get("bob")
    assert sum(remote.gets.values()) == asked and e.value.retry_after == pytest.approx(0.5)
    assert remote.url not in str(e.value) and "127.0.0.1" not in str(e.value)
    # a restart while the registry is down: the saved manifest and the pulled file serve alice
    fresh = store_of(tmp_path, engine_q4, remote.url)
    assert fresh.get("alice").key == alice.key
    with pytest.raises(RegistryUnavailable):
        fresh.get("bob")
    assert fresh.registry.status()["status"] == "unavailable"


def test_no_manifest_at_all_is_unavailable_not_not_found(made, engine_q4, tmp_path):
    with site({}) as s:
        url = s.url
    store = store_of(tmp_path, engine_q4, url)  # nothing listens there any more
    with pytest.raises(RegistryUnavailable, match="not in the server's folder, and the patch registry"):
        store.get("alice")


def test_unknown_names_fetch_the_manifest_at_most_once_per_ttl(remote, made, engine_q4, tmp_path):
    store = store_of(tmp_path, engine_q4, remote.url, ttl=1.0)
    t0 = time.monotonic()
    for i in range(50):
        with pytest.raises(PatchNotFound):
            store.get(f"nobody{i}")
    assert store.get("alice") and time.monotonic() - t0 < 1.0
    assert remote.gets["/manifest.json"] == 1
    remote.files["/carol.reft"] = made["carol"]
    remote.publish(alice=entry(made, "alice"), carol=entry(made, "carol"))
    with pytest.raises(PatchNotFound):  # a miss within the ttl of the last miss-fetch: not asked
        store.get("carol")
    assert remote.gets["/manifest.json"] == 1
    time.sleep(1.05)
    assert store.get("carol") and remote.gets["/manifest.json"] == 2
    for i in range(20):
        with pytest.raises(PatchNotFound):
            store.get(f"ghost{i}")
    assert remote.gets["/manifest.json"] == 3  # the first miss after carol's fetch, then none


def test_a_bad_manifest_entry_fails_only_its_name(made, engine_q4, tmp_path):
    with site({"/alice.reft": made["alice"]}) as s:
        s.publish(alice=entry(made, "alice"), bad={"url": "ftp://x/y.reft", "sha256": "00"})
        store = store_of(tmp_path, engine_q4, s.url)
        with pytest.raises(RegistryUnavailable, match=r"entry is invalid \(url: ftp scheme.*sha256: expected 64"):
            store.get("bad")
        assert store.get("alice")


def test_the_lru_evicts_the_least_recent_and_keeps_pins(made, engine_q4, tmp_path):
    for i in range(5):
        (tmp_path / f"p{i}.reft").write_bytes(made["alice" if i % 2 else "bob"])
    store = store_of(tmp_path, engine_q4, capacity=2, pin=["p0"])
    assert len(store) == 1 and store.loads == 1
    for name in ("p1", "p2", "p3"):
        store.get(name)
    assert list(store._items) == ["p0", "p2", "p3"] and store.loads == 4
    assert store.nbytes == sum(store.get(n).nbytes for n in ("p0", "p2", "p3")) and store.loads == 4
    store.get("p1")
    assert list(store._items) == ["p0", "p3", "p1"] and store.loads == 5


def test_memory_per_patch_is_its_arrays(made, engine_q4, tmp_path):
    """R, W and W - R (r x d float32) and b (r float32) per intervention."""
    d = engine_q4.base.n_embd
    for name, (_, _, r) in SPECS.items():
        (tmp_path / f"{name}.reft").write_bytes(made[name])
        assert store_of(tmp_path, engine_q4).get(name).nbytes == 3 * r * d * 4 + r * 4


@pytest.mark.parametrize("name,why", [("ghost", "no such patch"), ("broken", "reft.0.weight")])
def test_a_pinned_patch_that_cannot_be_loaded_stops_start_up(engine_q4, tmp_path, name, why):
    (tmp_path / "broken.reft").write_bytes(CORPUS["nan-weight"][0]())
    with pytest.raises(ReftError, match=f"(?s)--pin {name}: cannot be loaded: .*{why}"):
        store_of(tmp_path, engine_q4, pin=[name])


def test_a_server_serves_a_remote_patch_as_a_fresh_engine_runs_it(remote, made, tmp_path, smol_q4):
    import httpx
    from edge_reft.runtime import Engine
    from edge_reft.services.serve.server import create_app, running_server
    with pytest.raises(ReftError, match="--pin ghost"):
        create_app(str(smol_q4), tmp_path, registry=f"{remote.url}/manifest.json", pin=["ghost"])
    (tmp_path / "made").mkdir()
    remote.files["/liar.reft"] = made["alice"]
    remote.publish(alice=entry(made, "alice"), bob=entry(made, "bob"), liar=entry(made, "bob", url="liar.reft"),
                   gone=entry(made, "alice", url="http://127.0.0.1:9/x.reft"))
    msgs = [{"role": "user", "content": "Name a fruit."}]
    body = {"messages": msgs, "max_tokens": 16, "temperature": 0}
    with running_server(str(smol_q4), tmp_path, workers=1, n_ctx=1024, registry=f"{remote.url}/manifest.json",
                        pin=["bob"]) as url, httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/chat/completions", json={**body, "patch": "alice"})
        assert r.status_code == 200, r.text
        got = r.json()["choices"][0]["message"]["content"]
        r = c.post("/v1/chat/completions", json={**body, "model": "liar"})
        assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_patch"), r.text
        r = c.post("/v1/chat/completions", json={**body, "patch": "gone"})
        assert (r.status_code, r.json()["error"]["code"]) == (502, "registry_unavailable"), r.text
        assert r.headers["retry-after"] == "30" and "127.0.0.1" not in r.text
        r = c.post("/v1/chat/completions", json={**body, "patch": "nobody"})
        assert (r.status_code, r.json()["error"]["code"]) == (404, "patch_not_found"), r.text
        h = c.get("/health").json()
    assert remote.gets["/alice.reft"] == 1 and remote.gets["/bob.reft"] == 1 and remote.gets["/liar.reft"] == 1
    assert h["patches_cached"] == 2 and h["patch_cache_bytes"] == 2 * 27664  # alice, bob
    assert h["registry"]["status"] == "ok" and h["registry"]["patches"] == 4
    engine = Engine(smol_q4, n_ctx=1024)
    try:
        (tmp_path / "made" / "alice.reft").write_bytes(made["alice"])
        patch = engine.load_patch(tmp_path / "made" / "alice.reft")
        want = engine.generate(messages=msgs, patch=patch, max_tokens=16, temperature=0, stream=False,
                               cache="off").text
    finally:
        engine.close()
    assert got == want
