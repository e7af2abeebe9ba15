"""An OpenAI-compatible HTTP server with a patch per request (FastAPI + uvicorn).

Concurrency: ``workers`` engines (the model file mapped once by the OS), each
with ``slots`` sequences decoded together by a thread of its own (pool.py,
runtime/batching.py): every forward pass carries the next token of every
running request and prompt chunks of new ones, each row edited by its own
request's patches, so requests with different patches share one batch and
never each other's edits.  KV state is reused only under the exact rule: for
the same patch (its content hash) up to the first position whose edit
differs; for another patch only positions neither patch edits (what no patch
computes), which a new request takes from any slot holding them (cells
shared, not recomputed).  Each engine also keeps the state last computed
under each patch (runtime/kvstates.py), and a request goes to the worker
holding state for its patch when it can.  llama.cpp runs with the GIL
released, so workers run in parallel threads.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
import uuid
from typing import Any, AsyncIterator, Sequence

from edge_reft.errors import PatchMismatchError, ReftError, ReftFormatError

from starlette.requests import Request  # module level, as the bodies: FastAPI resolves annotations here

from edge_reft.runtime.edits import EMPTY

from .access import EVERYTHING, AccessKeys, Grant
from .middleware import MAX_BODY, AccessLog, BodyLimit, error_response, error_body
from .api import ChatRequest, CompletionRequest, patch_names  # module level: FastAPI resolves annotations
from .patchstore import PatchNameError, PatchNotFound, PatchOutsideFolder, PatchStore, PatchUnreadable
from .registry import PatchRefused, Registry, RegistryUnavailable
from .pool import ClientGone, EnginePool, QueueFull, job_events, race, until_disconnect



class ModelNotFound(ReftError):
    """A request's ``model`` names neither the base model nor a patch."""


def model_id_of(model: str) -> str:
    """The base model's id in the API: its file (or folder) name, without spaces."""
    name = os.path.basename(os.path.normpath(model))
    return "-".join((name[:-5] if name.endswith(".gguf") else name).split()) or "model"


def create_app(model: str | None, patches: str | os.PathLike[str], workers: int = 1, slots: int = 1,
               max_body: int = MAX_BODY, max_queue: int = 64, keys: AccessKeys | None = None,
               log: bool = False, registry: str | None = None, registry_ttl: float = 300.0,
               registry_cache: str | os.PathLike[str] | None = None, patch_cache: int = 256,
               pin: Sequence[str] = (), **engine_options: Any):
    """The FastAPI app over ``model`` (default: the embedded SmolLM2).  ``max_queue`` requests
    may wait for a worker (more: 503 with Retry-After); with ``keys``, each request needs a
    bearer key and may use only its patches; ``log``: one line per request on stderr.
    ``registry``: a manifest URL for names not in ``patches`` (patchstore.py, registry.py);
    ``patch_cache`` patch sets kept bound besides the ``pin`` ones.
    ``engine_options``: ``backend`` and the engine's keywords."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import StreamingResponse
    from starlette.exceptions import HTTPException

    from edge_reft.models import default_model
    model = str(default_model()) if model is None else model
    pool = EnginePool(model, workers, max_queue=max_queue, slots=slots, **engine_options)
    try:
        remote = registry and Registry(registry, registry_cache or os.path.join(patches, ".registry"),
                                       registry_ttl, base=pool.base)
        store = PatchStore(patches, pool.engines[0].patch_set, patch_cache, remote or None, pin)
    except BaseException:
        pool.close()
        raise
    model_id, created = model_id_of(model), int(os.stat(model).st_mtime)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        pool.close()

    app = FastAPI(title="edge-reft", version="1", lifespan=lifespan)
    app.state.pool, app.state.store = pool, store
    app.add_middleware(BodyLimit, max_body=max_body)
    if log:
        app.add_middleware(AccessLog)

    @app.exception_handler(ReftError)
    async def reft_error(request: Request, exc: ReftError):
        return _reft_error(exc, _public(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        return error_response(422, _validation_message(exc.errors()), "invalid_request",
                              _validation_field(exc.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        code = "unauthorized" if exc.status_code == 401 else "not_found" if exc.status_code == 404 else "http_error"
        return error_response(exc.status_code, str(exc.detail), code, headers=exc.headers)

    def grant_of(request: Request) -> Grant:
        if keys is None:
            return EVERYTHING
        g = keys.grant(request.headers.get("authorization"))
        if g is None:
            raise HTTPException(401, "a valid API key is required: send 'Authorization: Bearer KEY'",
                                headers={"WWW-Authenticate": "Bearer"})
        return g

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "fingerprint": pool.base.fingerprint,
                "workers": len(pool.engines), "slots": pool.slots, "busy": pool.busy, "waiting": pool.waiting,
                "patches_cached": len(store), "patch_cache_bytes": store.nbytes, "patch_loads": store.loads,
                "registry": store.registry.status() if store.registry else None}

    def model_card(name: str | None, names: list[str] = ()) -> dict:
        if name is None:
            return {"id": model_id, "object": "model", "created": created, "owned_by": "edge-reft",
                    "patches": list(names)}
        stamp = int(os.stat(store.path(name)).st_mtime)
        return {"id": name, "object": "model", "created": stamp, "owned_by": "edge-reft",
                "parent": model_id, "root": model_id}

    @app.get("/v1/models")
    async def models(request: Request):
        """The base model (its patches listed) and each patch as a model of its own."""
        grant = grant_of(request)
        names = await asyncio.to_thread(store.names, grant.allows)
        return {"object": "list", "data": [model_card(None, names), *map(model_card, names)]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str, request: Request):
        grant = grant_of(request)
        if name == model_id:
            return model_card(None, await asyncio.to_thread(store.names, grant.allows))
        if grant.allows(name) and await asyncio.to_thread(store.exists, name):
            return model_card(name)
        raise ModelNotFound(f"model {name!r:.80}: no such model; GET /v1/models lists them")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await _serve(request, req, dict(prompt=req.prompt, raw=True), "text_completion")

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        msgs = [m.as_dict() for m in req.messages]
        return await _serve(request, req, dict(messages=msgs), "chat.completion")

    async def _serve(request: Request, req, source: dict, kind: str):
        """Every way a request ends goes through here: refused before any work (4xx, 503),
        its client gone while it waits, during the prefill or the answer (the job is
        cancelled and its engine freed), or answered."""
        grant = grant_of(request)
        bad = req.unsupported()
        if bad:
            return error_response(400, bad[1], "unsupported_parameter", bad[0])
        try:
            names, by_model = patch_names(req, model_id)
        except ValueError as e:
            return error_response(400, str(e), "invalid_request", "model")
        pset = EMPTY
        try:
            for name in names:
                if not grant.allows(name):  # answered like a missing patch: no probing of names
                    raise PatchNotFound(f"patch {name!r:.80}: no such patch")
            if names:  # file access and math off the loop
                pset = await asyncio.to_thread(store.get_many, names)
        except (PatchNotFound, PatchNameError):
            if not by_model:
                raise
            raise ModelNotFound(f"model {req.model!r:.80}: no such model or patch; GET /v1/models "
                                "lists them") from None
        echo = req.model or model_id
        opts = dict(source, patch=pset, max_tokens=req.limit(), stop=req.stop_list(), **req.sampling())
        rid = f"{'chatcmpl' if kind != 'text_completion' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        gone = asyncio.ensure_future(until_disconnect(request.receive))
        job, streaming = None, False
        try:
            work = await race(pool.prepare(opts), gone)  # tokenizing: off the loop
            job = pool.start(work, stream=bool(req.stream))
            first = await race(job.next(), gone)  # errors found before the first token: a 4xx
            if first[0] == "error":
                return _failure(first[1])
            events = job_events(job, first, gone)
            if req.stream:
                streaming = True  # from here the stream owns the job and the watcher
                return StreamingResponse(_sse_stream(events, kind, rid, echo, req.include_usage(), gone),
                                         media_type="text/event-stream")
            try:
                async for what, value in events:
                    if what == "error":
                        return _failure(value)
                    if what == "done":
                        return _final(kind, rid, echo, value)
            finally:
                await events.aclose()
        except ClientGone:
            if job is not None:
                job.cancel()
            return error_response(499, "the client closed the request", "client_closed")
        except QueueFull as e:
            return error_response(503, str(e), "overloaded", headers={"Retry-After": "1"})
        finally:
            if not streaming:
                gone.cancel()

    async def _sse_stream(events, kind: str, rid: str, echo: str, usage: bool,
                          gone: asyncio.Task) -> AsyncIterator[str]:
        """The answer as server-sent events (with ``usage``, a last chunk carries the token
        counts, as OpenAI's stream_options.include_usage); a client that goes away (seen by
        the disconnect watcher or by a failed send) cancels the job at the next token."""
        first = True
        try:
            async for what, value in events:
                if what == "piece":
                    yield _sse(_chunk(kind, rid, echo, value, None, first))
                    first = False
                elif what == "done":
                    yield _sse(_chunk(kind, rid, echo, "", value.finish_reason, first))
                    if usage:
                        yield _sse({**_chunk(kind, rid, echo, "", None, False), "choices": [],
                                    "usage": _usage(value)})
                else:
                    yield _sse(error_body(_public(value), "server_error", "internal_error"))
            yield "data: [DONE]\n\n"
        except ClientGone:
            return
        finally:  # synchronous first: under a cancelled scope every await raises again
            gone.cancel()
            await events.aclose()

    def _public(exc: BaseException) -> str:
        """An error's text for a client: no server path in it."""
        return str(exc).replace(str(store.folder) + os.sep, "").replace(str(store.folder), "<patches>")

    def _failure(exc: BaseException):
        if isinstance(exc, ReftError):
            return _reft_error(exc, _public(exc))
        return error_response(500, f"internal error ({type(exc).__name__})", "internal_error")

    return app


def _reft_error(exc: ReftError, message: str | None = None):
    msg = str(exc) if message is None else message
    if isinstance(exc, ModelNotFound):
        return error_response(404, msg, "model_not_found", "model")
    if isinstance(exc, PatchNotFound):
        return error_response(404, msg, "patch_not_found", "patch")
    if isinstance(exc, PatchNameError):
        return error_response(400, msg, "invalid_patch_name")
    if isinstance(exc, PatchOutsideFolder):
        return error_response(403, msg, "patch_outside_folder")
    if isinstance(exc, PatchUnreadable):
        return error_response(422, msg, "invalid_patch", "file")
    if isinstance(exc, RegistryUnavailable):  # upstream failed, not this server: not a 503 (overloaded)
        return error_response(502, msg, "registry_unavailable", "model",
                              headers={"Retry-After": str(max(1, round(exc.retry_after)))})
    if isinstance(exc, PatchRefused):
        return error_response(422, msg, "invalid_patch", "sha256")
    if isinstance(exc, QueueFull):
        return error_response(503, msg, "overloaded", headers={"Retry-After": "1"})
    if isinstance(exc, ReftFormatError):
        field = exc.problems[0].split(":")[0] if exc.problems else None
        return error_response(422, msg, "invalid_patch", field)
    if isinstance(exc, PatchMismatchError):
        return error_response(422, msg, "patch_for_another_model")
    return error_response(400, msg, "invalid_request")


def _validation_field(errors) -> str | None:
    loc = [str(x) for x in (errors[0].get("loc", ()) if errors else ()) if x != "body"]
    return ".".join(loc) or None


def _validation_message(errors) -> str:
    """pydantic's errors as one line each (location: message), without echoing the input."""
    lines = []
    for e in list(errors)[:8]:
        loc = ".".join(str(x) for x in e.get("loc", ()))
        lines.append(f"{loc}: {e.get('msg', 'invalid')}")
    return "; ".join(lines) or "invalid request"


def _usage(r) -> dict:
    return {"prompt_tokens": len(r.prompt_tokens), "completion_tokens": len(r.tokens),
            "total_tokens": len(r.prompt_tokens) + len(r.tokens)}


def _final(kind: str, rid: str, model: str, r) -> dict:
    usage = _usage(r)
    if kind == "text_completion":
        choice = {"index": 0, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None}
    else:
        choice = {"index": 0, "message": {"role": "assistant", "content": r.text},
                  "finish_reason": r.finish_reason}
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": [choice],
            "usage": usage}


def _chunk(kind: str, rid: str, model: str, text: str, finish: str | None, first: bool) -> dict:
    if kind == "text_completion":
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        obj = "text_completion"
    else:
        delta: dict[str, str] = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        obj = "chat.completion.chunk"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice]}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


@contextlib.contextmanager
def running_server(model: str | None, patches: str | os.PathLike[str], workers: int = 2,
                   host: str = "127.0.0.1", **options: Any):
    """Serve in a background thread on a free port of ``host``; yields the base URL."""
    import socket

    import uvicorn
    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    app = create_app(model, patches, workers=workers, **options)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 120
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise ReftError("the server did not start")
        time.sleep(0.05)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
