"""``edge-reft serve --ray``: the same app as ``edge-reft serve``, as Ray Serve deployments whose
requests go to replicas that already hold their patch (model multiplexing keyed by patch name).

Two deployments.  ``Ingress`` (FastAPI, I/O only, no CPU reserved) takes every request; for
``/v1/chat/completions`` and ``/v1/completions`` it reads the patch names the way the plain
server does (``api.patch_names``) and forwards the request through a handle with
``multiplexed_model_id`` = the names joined by ``+`` ("" for no patch, or for a body the server
will refuse).  Ray's router sends it to a replica that advertises that id (one that loaded it
recently), else to the replica holding the fewest.  ``Replica`` (``replicas`` of them, each its
own process) holds one app of ``server.create_app``: its engines, its PatchStore and its saved
KV states; the request runs through that app unchanged, so every answer and every error is
the plain server's.  Its ``@serve.multiplexed`` loader binds the patch through the app's
PatchStore; Ray keeps the loaded ids in an LRU of ``max_patches`` per replica and reports them
to the routers.  Each response says which replica answered (``x-edge-reft-replica``) and, for
a patch, whether that replica held it already (``x-edge-reft-patch-cache: hit|miss``).

Nothing is shared between replicas: patches, KV states and queues are per replica.  This
module is the only one that imports ray; the plain server never imports it.
"""
import asyncio  # no `from __future__ import annotations`: Ray's ingress rebuilds the routes, and FastAPI
               # must see Request as a class, not a string to resolve
import contextlib
import json
import os
import sys
import time
from typing import Any, AsyncIterator

from edge_reft.errors import ReftError

from .raycluster import RayMissing, connected  # first: it imports ray, on the loopback

try:
    from ray import serve
    from ray.serve.exceptions import BackPressureError
except ImportError as e:  # the [ray] extra is optional: say how to get it, in one line
    raise RayMissing(f"Ray Serve is not installed ({e.name or e}): pip install 'edge-reft[ray]' "
                     "(ray[serve]==2.60.0)") from None

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from .api import ChatRequest, CompletionRequest, patch_names
from .middleware import MAX_BODY, error_response
from .server import create_app, model_id_of

ROUTES = {"/v1/chat/completions": ChatRequest, "/v1/completions": CompletionRequest}
APP_NAME = "edge-reft"


def multiplexed_id(path: str, body: bytes, base_id: str) -> str:
    """The patch names a generation request asks for, joined by ``+``; "" for no patch and for
    anything the replica will refuse (it answers with the plain server's error)."""
    kind = ROUTES.get(path)
    if kind is None:
        return ""
    try:
        names, _ = patch_names(kind.model_validate(json.loads(body)), base_id)
    except ValueError:  # bad JSON, a body that fails validation, conflicting names
        return ""
    return "+".join(names)


class Held:
    """A patch a replica has loaded (Ray's LRU holds these): the first request to use it after
    a load is the miss, every later one a hit."""

    def __init__(self, patch_set):
        self.patch_set, self.used = patch_set, False

    def claim(self) -> bool:
        """True for the request that caused the load."""
        first, self.used = not self.used, True
        return first


@contextlib.contextmanager
def _cpu_share(n: int):
    """``os.cpu_count()`` reads ``n`` while the app is built: the pool gives each engine
    cpu_count // workers threads and create_app takes no thread count, so without this every
    replica's engines would spin on every core of the node."""
    real = os.cpu_count
    os.cpu_count = lambda: n
    try:
        yield
    finally:
        os.cpu_count = real


async def asgi_stream(app, scope: dict, body: bytes) -> AsyncIterator[Any]:
    """Run one request through an ASGI ``app`` in this process: yields (status, headers) and
    then the body's chunks as the app sends them.  The app sees its client go (an
    ``http.disconnect``) when the response is complete or the consumer stops early."""
    out: asyncio.Queue = asyncio.Queue()
    gone, sent = asyncio.Event(), [False]

    async def receive():
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    task = asyncio.ensure_future(app(scope, receive, out.put))
    task.add_done_callback(lambda t: out.put_nowait(None))
    started = False
    try:
        while (msg := await out.get()) is not None:
            if msg["type"] == "http.response.start":
                started = True
                yield msg["status"], list(msg.get("headers", []))
            elif msg["type"] == "http.response.body":
                if msg.get("body"):
                    yield msg["body"]
                if not msg.get("more_body", False):
                    break
        if not started:  # the app ended without answering: a 500 in the server's shape
            why = "cancelled" if task.cancelled() else type(task.exception()).__name__
            r = error_response(500, f"internal error ({why})", "internal_error")
            yield r.status_code, list(r.raw_headers)
            yield r.body
    finally:
        gone.set()
        with contextlib.suppress(BaseException):  # its error, if any, was answered above
            await asyncio.wait_for(task, timeout=30)


@serve.deployment(name="Replica", max_constructor_retry_count=2)  # a model that fails to load fails fast
class Replica:
    """One edge-reft app (``create_app``) and the patches Ray routes to it."""

    def __init__(self, model: str, patches: str, workers: int, threads: int, max_patches: int,
                 app_options: dict):
        with _cpu_share(threads):
            self.app = create_app(model, patches, workers=workers, **app_options)
        self.store, self.keys = self.app.state.store, app_options.get("keys")
        self.tag = serve.get_replica_context().replica_tag.encode()

        async def load_patch(model_id: str) -> Held:  # Ray calls it on a miss only
            return Held(await asyncio.to_thread(self.store.get_many, model_id.split("+")))
        self.load_patch = serve.multiplexed(max_num_models_per_replica=max_patches)(load_patch)

    def _servable(self, names: list[str], headers: list) -> bool:
        """Whether the app will serve these patches to this client (the store binds them now, or
        says why not): only those enter Ray's LRU, so an unknown name or a stranger's request
        never evicts a user's patch, and a refused one is answered by the app alone."""
        if self.keys is not None:
            auth = dict(headers).get(b"authorization", b"").decode("latin-1")
            grant = self.keys.grant(auth or None)
            if grant is None or not all(grant.allows(n) for n in names):
                return False
        try:
            for name in names:  # each on its own: a stack is bound (and judged) by the app
                self.store.get(name)
        except ReftError:
            return False
        return True

    async def handle(self, scope: dict, body: bytes) -> AsyncIterator[Any]:
        extra = [(b"x-edge-reft-replica", self.tag)]
        model_id = serve.get_multiplexed_model_id()
        if model_id and await asyncio.to_thread(self._servable, model_id.split("+"), scope["headers"]):
            with contextlib.suppress(ReftError):  # changed on disk meanwhile: the app answers it
                held = await self.load_patch(model_id)
                extra.append((b"x-edge-reft-patch-cache", b"miss" if held.claim() else b"hit"))
        first = True
        async for item in asgi_stream(self.app, scope, body):
            if first:
                status, headers = item
                item, first = (status, headers + extra), False
            yield item

    def __del__(self):  # Ray calls it when the replica stops (and Python may again): free the contexts
        app, self.app = getattr(self, "app", None), None
        if app is not None:
            app.state.pool.close()


def _cancel(response) -> None:
    """Cancel a handle call.  ``DeploymentResponseGenerator.cancel()`` waits for the request's
    assignment (blocking, with the router in its own loop) and raises the request's own error
    if it failed (a BackPressureError, say): nothing is left to cancel then."""
    with contextlib.suppress(Exception):
        response.cancel()


# serve.ingress pickles this app, its routes and the module globals they use, when the class below is
# decorated: whatever a route calls must be defined above it
web = FastAPI(title="edge-reft on Ray Serve", docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress(web)
class Ingress:
    """Reads each request's patch names and hands it to a replica that holds them."""

    def __init__(self, replica, base_id: str, max_body: int):
        self.replica, self.base_id, self.max_body = replica, base_id, max_body

    @web.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
    async def forward(self, path: str, request: Request):
        body = b""
        async for chunk in request.stream():  # one byte past the limit: the replica says 413
            body += chunk
            if len(body) > self.max_body:
                break
        s = request.scope
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": s["method"], "scheme": "http", "path": s["path"],
                 "raw_path": s.get("raw_path") or s["path"].encode(), "query_string": s.get("query_string", b""),
                 "root_path": "", "headers": list(s["headers"]),
                 "client": tuple(s["client"]) if s.get("client") else None, "server": ("ray-serve", 0)}
        mid = multiplexed_id(s["path"], body, self.base_id) if s["method"] == "POST" else ""
        gen = self.replica.options(multiplexed_model_id=mid, stream=True).handle.remote(scope, body)
        try:
            status, headers = await gen.__anext__()
        except asyncio.CancelledError:  # the client left while the request waited for a replica
            _cancel(gen)
            raise
        except BackPressureError as e:  # more waiting than --queue: as the plain server's full queue
            waiting, limit = e.args[:2]
            return error_response(503, f"all replicas are busy and {waiting} requests wait (the limit, "
                                  f"--queue {limit}); retry shortly", "overloaded", headers={"Retry-After": "1"})
        except Exception as e:  # no replica could take it (all failed, or shutting down)
            return error_response(503, f"no replica answered ({type(e).__name__}); retry shortly",
                                  "overloaded", headers={"Retry-After": "1"})

        async def rest():
            try:
                async for chunk in gen:
                    yield chunk
            finally:  # the client left mid-answer: the replica's job is cancelled
                _cancel(gen)
        response = StreamingResponse(rest(), status_code=status)
        response.raw_headers = headers
        return response


def application(model: str, patches: str, *, replicas: int = 2, workers: int = 1, threads: int | None = None,
                max_patches: int = 16, max_ongoing: int | None = None, max_body: int = MAX_BODY,
                **app_options: Any):
    """The Ray Serve application: ``replicas`` replicas of ``workers`` engines and ``threads``
    threads each (default: the node's cores // replicas), up to ``max_patches`` patches held per
    replica, ``max_ongoing`` requests a replica takes at once (default 8 x workers; the rest wait in
    Ray's router, which sends them to a replica holding their patch while one has room, else to the
    one holding the fewest: fewer means more misses, more means longer queues behind a busy
    replica).  ``app_options``: ``create_app``'s."""
    problems = []
    for name, v, low in (("replicas", replicas, 1), ("workers", workers, 1), ("max_patches", max_patches, 1),
                         ("threads", 1 if threads is None else threads, 1),
                         ("max_ongoing", 1 if max_ongoing is None else max_ongoing, 1)):
        if not isinstance(v, int) or v < low:
            problems.append(f"{name} {v!r}: expected an integer >= {low}")
    if not os.path.exists(model):
        problems.append(f"model {model}: no such file or folder")
    if not os.path.isdir(patches):
        problems.append(f"patches {patches}: not a folder")
    if problems:
        raise ReftError("; ".join(problems))
    threads = threads or max(1, (os.cpu_count() or 1) // replicas)
    options = dict(app_options, max_body=max_body)
    # the server's --queue bounds the requests waiting in Ray's router (more: 503) as it bounds its pool's
    # (Ray takes no 0: --queue 0 lets one wait)
    replica = Replica.options(num_replicas=replicas, max_ongoing_requests=max_ongoing or 8 * workers,
                              max_queued_requests=max(1, app_options.get("max_queue", 64)),
                              ray_actor_options={"num_cpus": threads}).bind(
        os.path.abspath(model), os.path.abspath(patches), workers, threads, max_patches, options)
    return Ingress.bind(replica, model_id_of(model), max_body)


def app_builder(args: dict):
    """For ``serve run`` and a Serve config file (KubeRay's RayService):
    ``serve run edge_reft.services.serve.ray_serve:app_builder model=M.gguf patches=DIR replicas=4``."""
    ints = {"replicas", "workers", "threads", "max_patches", "max_ongoing", "n_ctx"}
    known = ints | {"model", "patches", "state_cache_mb"}
    unknown = sorted(set(args) - known)
    if unknown or "patches" not in args:
        raise ReftError(f"serve run arguments {unknown or ''}: expected patches=DIR and any of {sorted(known)}")
    kw = {k: int(v) if k in ints else float(v) if k == "state_cache_mb" else v for k, v in args.items()}
    if "model" not in kw:
        from edge_reft.models import default_model
        kw["model"] = str(default_model())
    return application(kw.pop("model"), kw.pop("patches"), **kw)


@contextlib.contextmanager
def local_cluster(host: str = "127.0.0.1", port: int = 8000, num_cpus: int | None = None, quiet: bool = True):
    """A Ray cluster of this machine alone (its processes on 127.0.0.1, no dashboard UI) and
    Serve's HTTP proxy on ``host:port``; yields the base URL.  With ``RAY_ADDRESS`` set, joins
    that cluster instead, its one proxy on the head node (start there).  ``quiet``: the
    replicas' output (the access log) is not shown here.  On the way out, whatever happened, a
    cluster of our own is shut down; a joined one loses only this app (it may serve others)."""
    address = os.environ.get("RAY_ADDRESS")
    with connected(address, num_cpus, quiet):
        try:
            # Serve already running on a joined cluster keeps its own proxy settings (Ray says so)
            serve.start(proxy_location="HeadOnly", http_options={"host": host, "port": port},
                        logging_config={"log_level": "WARNING"})
            yield f"http://{host}:{port}"
        finally:
            with contextlib.suppress(Exception):
                stop() if address else serve.shutdown()


def run(app) -> None:
    """Deploy ``app`` (from ``application``) on the running cluster; returns once it serves
    (a replica that cannot start fails it after two retries)."""
    serve.run(app, name=APP_NAME, route_prefix="/", logging_config={"log_level": "WARNING"})  # no line a call:
    # the app's own access log (--quiet turns it off) says what was asked


def stop() -> None:
    """Delete the app: its replicas stop, their patches and KV states with them; Ray and Serve stay
    up.  (Deploying another shape over a running app is a rolling update, which starts new
    replicas before it stops old ones: on a cluster with no CPU to spare it waits forever.)"""
    serve.delete(APP_NAME)


def serve_forever(model: str, patches: str, host: str, port: int, quiet: bool = False, **options: Any) -> int:
    """``edge-reft serve --ray``: start, say where, serve until Ctrl-C, shut everything down."""
    app = application(model, patches, **options)
    with local_cluster(host, port, quiet=quiet):
        run(app)
        where = os.environ.get("RAY_ADDRESS") or "a local Ray cluster on 127.0.0.1"
        print(f"[edge-reft] serving on http://{host}:{port} through Ray Serve ({options.get('replicas', 2)} "
              f"replicas, {where}); Ctrl-C stops it", file=sys.stderr)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    return 0
