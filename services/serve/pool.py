"""Engines for the server, each decoding many requests together, and the asyncio face of a
request that the event loop can abandon at any point without leaking a slot or a thread.

Each worker is one engine with ``slots`` sequences and one thread of its own that steps its
``Batcher`` (runtime/batching.py): every step decodes the next token of every running
request and prompt chunks of new ones in one forward pass, each request's rows edited by
its own patches.  A request goes to the worker holding KV state for its patches, else to
the least loaded.  One mechanism owns every way a request can end (done, failed, or its
client gone while it waits, during its prompt or during the stream): ``Job`` is the
request's events on an asyncio queue, ``cancel`` frees its slot at the batch thread's next
step, and ``until_disconnect`` is what the handlers race against.  No executor thread ever
waits on a generation, so abandoned requests cannot exhaust asyncio's default thread pool.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import threading
from typing import Any, AsyncIterator, Awaitable, Callable

from edge_reft.errors import ReftError
from edge_reft.runtime.batching import Batcher, Request, make_request

__all__ = ["EnginePool", "Job", "QueueFull", "ClientGone", "race", "job_events", "until_disconnect"]


class QueueFull(ReftError):
    """Every slot is busy and the queue holds its maximum of waiting requests."""


class EnginePool:
    """``workers`` engines of ``slots`` sequences each, every one stepped by a thread of its
    own.  At most ``max_queue`` requests wait for a slot in all; more are refused at once
    (``QueueFull``).  A backend that decodes one sequence at a time gets one slot a worker."""

    def __init__(self, model: str | None, workers: int, max_queue: int = 64, slots: int = 1,
                 **engine_options: Any):
        if not isinstance(workers, int) or workers < 1:
            raise ReftError(f"workers: {workers!r}, expected an integer >= 1")
        if not isinstance(max_queue, int) or max_queue < 0:
            raise ReftError(f"max_queue: {max_queue!r}, expected an integer >= 0")
        if not isinstance(slots, int) or slots < 1:
            raise ReftError(f"slots: {slots!r}, expected an integer >= 1")
        from edge_reft.runtime import Engine
        threads = max(1, (os.cpu_count() or 1) // workers)
        if slots > 1:
            engine_options["slots"] = slots
        self.engines = [Engine(model, n_threads=threads, **engine_options) for _ in range(workers)]
        self.base = self.engines[0].base
        self.slots = self.engines[0].n_seq
        self.max_queue = max_queue
        self.batchers = [Batcher(e) for e in self.engines]
        # one thread tokenizes requests (chat template, tokenizer) off the event loop
        self.prep = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="edge-reft-prep")
        self._closing = False
        self._threads = [threading.Thread(target=self._loop, args=(b,), name=f"edge-reft-batch-{i}", daemon=True)
                         for i, b in enumerate(self.batchers)]
        for t in self._threads:
            t.start()

    @property
    def waiting(self) -> int:
        return sum(b.n_waiting for b in self.batchers)

    @property
    def busy(self) -> int:
        return sum(b.active for b in self.batchers)

    def _loop(self, batcher: Batcher) -> None:
        with batcher.engine._exclusive():
            while not self._closing:
                if not batcher.step():
                    batcher.wait_for_work(0.5)

    def request(self, opts: dict) -> Request:
        """The engine-side request of a handler's options (tokenized, patches bound): blocking,
        call it off the event loop.  Bad options raise here, before any slot is taken."""
        return make_request(self.engines[0], **opts)

    def start(self, req: Request, stream: bool = True) -> "Job":
        """Queue ``req`` on the worker holding state for its patches (else the least loaded);
        ``QueueFull`` when ``max_queue`` requests wait already."""
        if self.waiting >= self.max_queue:
            raise QueueFull(f"all {self.busy} slots are busy and {self.waiting} requests wait (the limit, "
                            f"--queue {self.max_queue}); retry shortly")
        load = [(b.active + b.n_waiting, i) for i, b in enumerate(self.batchers)]
        best = min(load)[1]
        if len(self.batchers) > 1:
            holding = [(n, i) for n, i in load if n < self.slots and self.engines[i].holds_state(req.pset.key)]
            if holding:
                best = min(holding)[1]
        return Job(self.batchers[best], req, stream)

    async def prepare(self, opts: dict) -> Request:
        """``request(opts)`` in the pool's tokenizing thread."""
        return await asyncio.get_running_loop().run_in_executor(self.prep, self.request, opts)

    def close(self) -> None:
        self.prep.shutdown(wait=False, cancel_futures=True)
        self._closing = True
        for b in self.batchers:
            b.wake()
        for t in self._threads:
            t.join(timeout=60)
        for e in self.engines:
            e.close()


class Job:
    """One request in a batcher; its events ("piece", text) when ``stream``, then ("done",
    Completion) or ("error", exc) arrive on an asyncio queue (a whole answer wakes the event
    loop once, not once a token).  ``cancel()`` stops it before its next token (or takes it
    out of the queue) and frees its slot."""

    def __init__(self, batcher: Batcher, req: Request, stream: bool = True):
        self.batcher, self.req = batcher, req
        self.events: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self.finished = threading.Event()
        if stream:
            req.on_piece = lambda text: self._post(("piece", text))
        req.on_done = lambda c: self._end(("done", c))
        req.on_error = lambda e: self._end(("error", e))
        batcher.submit(req)

    def cancel(self) -> None:
        if not self.finished.is_set():
            self.batcher.cancel(self.req)

    def _post(self, item: tuple[str, Any]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens any more
            self._loop.call_soon_threadsafe(self.events.put_nowait, item)

    def _end(self, item: tuple[str, Any]) -> None:
        self.finished.set()
        self._post(item)

    async def next(self) -> tuple[str, Any]:
        return await self.events.get()


async def until_disconnect(receive: Callable[[], Awaitable[dict]]) -> None:
    """Return when the client has gone (an ASGI ``http.disconnect``); the body must have been
    read already, so ``receive`` has nothing else to deliver."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def race(aw: Awaitable, gone: asyncio.Task, orphan: Callable[[Any], None] | None = None):
    """``aw``'s result, or ``ClientGone`` once ``gone`` (an ``until_disconnect`` task) ends first.
    ``aw`` is cancelled then (so whatever it waited for is given up); a result it produced
    all the same (an engine handed over at that instant) goes to ``orphan``."""
    task = asyncio.ensure_future(aw)
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # we were cancelled ourselves: give up what we waited for too
        _abandon(task, orphan)
        raise
    if task in done:
        return task.result()
    _abandon(task, orphan)
    raise ClientGone()


def _abandon(task: asyncio.Future, orphan: Callable[[Any], None] | None) -> None:
    if not task.done():
        task.cancel()
        if orphan is not None:
            task.add_done_callback(lambda t: _abandon(t, orphan))
    elif orphan is not None and not task.cancelled() and task.exception() is None:
        orphan(task.result())


class ClientGone(Exception):
    """The client disconnected; nothing is left to answer."""


async def job_events(job: Job, first: tuple[str, Any], gone: asyncio.Task) -> AsyncIterator[tuple[str, Any]]:
    """Every event of ``job`` from ``first`` on, until done or error; cancels the job when the
    consumer stops early (the client left) or ``gone`` fires."""
    try:
        item = first
        while True:
            yield item
            if item[0] != "piece":
                return
            item = await race(job.next(), gone)
    finally:
        job.cancel()
