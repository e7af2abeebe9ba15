"""An OpenAI-compatible HTTP server with a patch per request (FastAPI + uvicorn).

Concurrency: a pool of engines (one llama.cpp context each, the model file
mapped once by the OS).  A request takes a free engine for its whole
generation and gives it back after, so it never shares a context with
another request.  An engine reuses KV state only under the exact rule: for
the same patch (its content hash) up to the first position whose edit
differs; for another patch only positions neither patch edits (what no patch
computes).  Each engine also keeps the state last computed under each patch
(runtime/kvstates.py) and the pool sends a request to an engine holding
state for its patch when it can (bounded unfairness), so reuse survives
many users.  llama.cpp runs with the GIL released, so engines work in
parallel threads.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import threading
import time
import uuid
from typing import Any, AsyncIterator

from edge_reft.errors import PatchMismatchError, ReftError, ReftFormatError

from .api import ChatRequest, CompletionRequest  # module level: FastAPI resolves annotations here
from .patchstore import PatchNameError, PatchNotFound, PatchOutsideFolder, PatchStore

MAX_BODY = 1 << 20


class EnginePool:
    """Free engines and waiting requests.  A request goes to a free engine that holds KV
    state computed under its patch if there is one; a freed engine goes to the oldest waiter
    whose patch it holds state for among the next ``window`` waiters, else to the oldest:
    cache reuse without letting a request be passed over more than ``window`` times."""

    def __init__(self, model: str | None, workers: int, **engine_options: Any):
        from . import Engine
        threads = max(1, (os.cpu_count() or 1) // workers)
        self.engines = [Engine(model, n_threads=threads, **engine_options) for _ in range(workers)]
        self.base = self.engines[0].base
        self.window = 2 * workers
        self._idle = list(self.engines)
        self._waiters: list[tuple[str, asyncio.Future, list[int]]] = []  # key, future, times passed over

    async def acquire(self, key: str = ""):
        if self._idle:
            match = [e for e in self._idle if e.holds_state(key)]
            engine = match[0] if match else self._idle[0]
            self._idle.remove(engine)
            return engine
        fut = asyncio.get_running_loop().create_future()
        entry = (key, fut, [0])
        self._waiters.append(entry)
        try:
            return await fut
        except asyncio.CancelledError:
            if entry in self._waiters:
                self._waiters.remove(entry)
            elif fut.done() and not fut.cancelled():
                self.release(fut.result())
            raise

    def release(self, engine) -> None:
        self._waiters = [w for w in self._waiters if not w[1].done()]  # cancelled meanwhile
        if not self._waiters:
            self._idle.append(engine)
            return
        pick = 0
        if self._waiters[0][2][0] < self.window:
            pick = next((i for i, (k, _, _) in enumerate(self._waiters[:self.window])
                         if engine.holds_state(k)), 0)
        for _, _, passed in self._waiters[:pick]:
            passed[0] += 1
        _, fut, _ = self._waiters.pop(pick)
        fut.set_result(engine)

    def close(self) -> None:
        for e in self.engines:
            e.close()


def create_app(model: str | None, patches: str | os.PathLike[str], workers: int = 1,
               max_body: int = MAX_BODY, **engine_options: Any):
    from fastapi import FastAPI, Request
    from fastapi.responses import StreamingResponse

    pool = EnginePool(model, workers, **engine_options)
    store = PatchStore(patches, pool.base)
    model_id = pool.base.name or pool.base.architecture

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        pool.close()

    app = FastAPI(title="edge-reft", version="1", lifespan=lifespan)
    app.state.pool, app.state.store = pool, store

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > max_body):
            return _error(413, f"request body of {size} bytes exceeds the limit of {max_body}", "too_large")
        if size is None and request.method == "POST":
            body = b""
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_body:
                    return _error(413, f"request body exceeds the limit of {max_body} bytes", "too_large")
            request._body = body
        return await call_next(request)

    @app.exception_handler(ReftError)
    async def reft_error(request: Request, exc: ReftError):
        return _reft_error(exc)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "fingerprint": pool.base.fingerprint,
                "workers": len(pool.engines), "patches_cached": len(store), "patch_loads": store.loads}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "owned_by": "edge-reft",
                                            "patches": store.names()}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        return await _serve(req, dict(prompt=req.prompt, raw=True), "text_completion")

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        msgs = [m.model_dump() for m in req.messages]
        return await _serve(req, dict(messages=msgs), "chat.completion")

    async def _serve(req, source: dict, kind: str):
        patch = store.get(req.patch) if req.patch else None  # 400/403/404/422 before any work
        pset = pool.engines[0].patch_set(patch)  # compiled once; engines of one model share it
        opts = dict(source, patch=pset, max_tokens=req.max_tokens, temperature=req.temperature,
                    top_p=req.top_p, seed=req.seed, stop=req.stop_list())
        rid = f"{'chatcmpl' if kind != 'text_completion' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        engine = await pool.acquire(pset.key)
        if not req.stream:
            try:
                r = await asyncio.to_thread(lambda: engine.generate(stream=False, **opts))
            finally:
                pool.release(engine)
            return _final(kind, rid, model_id, r)
        return StreamingResponse(_stream(engine, opts, kind, rid), media_type="text/event-stream")

    async def _stream(engine, opts: dict, kind: str, rid: str) -> AsyncIterator[str]:
        """Generate in a thread that owns the engine until it is done; a client that goes
        away cancels the generation at the next token."""
        q: queue.Queue = queue.Queue()
        cancel = threading.Event()
        loop = asyncio.get_running_loop()

        def work() -> None:
            try:
                gen = engine.generate(stream=True, **opts)
                for piece in gen:
                    if cancel.is_set():
                        gen.close()
                        return
                    q.put(("piece", piece))
                q.put(("done", gen.result))
            except BaseException as e:  # reported in the stream; the engine stays usable
                q.put(("error", e))
            finally:
                loop.call_soon_threadsafe(pool.release, engine)
        threading.Thread(target=work, daemon=True).start()
        try:
            first = True
            while True:
                what, value = await asyncio.to_thread(q.get)
                if what == "piece":
                    yield _sse(_chunk(kind, rid, model_id, value, None, first))
                    first = False
                elif what == "done":
                    yield _sse(_chunk(kind, rid, model_id, "", value.finish_reason, first))
                    break
                else:
                    yield _sse({"error": {"message": str(value), "type": type(value).__name__}})
                    break
            yield "data: [DONE]\n\n"
        finally:
            cancel.set()

    return app


def _error(status: int, message: str, kind: str, field: str | None = None):
    from fastapi.responses import JSONResponse
    err: dict[str, Any] = {"message": message, "type": kind}
    if field:
        err["field"] = field
    return JSONResponse({"error": err}, status_code=status)


def _reft_error(exc: ReftError):
    if isinstance(exc, PatchNotFound):
        return _error(404, str(exc), "patch_not_found")
    if isinstance(exc, (PatchNameError,)):
        return _error(400, str(exc), "invalid_patch_name")
    if isinstance(exc, PatchOutsideFolder):
        return _error(403, str(exc), "patch_outside_folder")
    if isinstance(exc, ReftFormatError):
        field = exc.problems[0].split(":")[0] if exc.problems else None
        return _error(422, str(exc), "invalid_patch", field)
    if isinstance(exc, PatchMismatchError):
        return _error(422, str(exc), "patch_for_another_model")
    return _error(400, str(exc), "invalid_request")


def _final(kind: str, rid: str, model: str, r) -> dict:
    usage = {"prompt_tokens": len(r.prompt_tokens), "completion_tokens": len(r.tokens),
             "total_tokens": len(r.prompt_tokens) + len(r.tokens)}
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
                   host: str = "127.0.0.1", **engine_options: Any):
    """Serve in a background thread on a free port of ``host``; yields the base URL."""
    import socket

    import uvicorn
    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    app = create_app(model, patches, workers=workers, **engine_options)
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
