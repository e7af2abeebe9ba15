"""Engines for the server: a bounded queue in front of them, and a generation run in its own
thread that the event loop can abandon at any point without leaking the engine or a thread.

One mechanism owns every way a request can end (done, failed, or its client gone while it
waits in the queue, during the prefill or during the stream): ``EnginePool.acquire`` queues
it (boundedly: ``QueueFull`` beyond ``max_queue``), ``Job`` runs it and always releases the
engine when its thread ends, and ``until_disconnect`` is what the handlers race against.  No executor thread ever waits on a
generation, so abandoned requests cannot exhaust asyncio's default thread pool.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from typing import Any, AsyncIterator, Awaitable, Callable

from edge_reft.errors import ReftError


class QueueFull(ReftError):
    """Every engine is busy and the queue holds its maximum of waiting requests."""


class EnginePool:
    """Free engines and waiting requests.  A request goes to a free engine that holds KV
    state computed under its patch if there is one; a freed engine goes to the oldest waiter
    whose patch it holds state for among the next ``window`` waiters, else to the oldest:
    cache reuse without letting a request be passed over more than ``window`` times.
    At most ``max_queue`` requests wait; more are refused at once (``QueueFull``)."""

    def __init__(self, model: str | None, workers: int, max_queue: int = 64, **engine_options: Any):
        if not isinstance(workers, int) or workers < 1:
            raise ReftError(f"workers: {workers!r}, expected an integer >= 1")
        if not isinstance(max_queue, int) or max_queue < 0:
            raise ReftError(f"max_queue: {max_queue!r}, expected an integer >= 0")
        from edge_reft.runtime import Engine
        threads = max(1, (os.cpu_count() or 1) // workers)
        self.engines = [Engine(model, n_threads=threads, **engine_options) for _ in range(workers)]
        self.base = self.engines[0].base
        self.window = 2 * workers
        self.max_queue = max_queue
        self._idle = list(self.engines)
        self._waiters: list[tuple[str, asyncio.Future, list[int]]] = []  # key, future, times passed over

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiters if not w[1].done())

    @property
    def busy(self) -> int:
        return len(self.engines) - len(self._idle)

    async def acquire(self, key: str = ""):
        """A free engine, or a place in the queue; ``QueueFull`` when the queue is full.
        Cancelled while waiting, it leaves the queue (or hands on an engine given meanwhile)."""
        if self._idle:
            match = [e for e in self._idle if e.holds_state(key)]
            engine = match[0] if match else self._idle[0]
            self._idle.remove(engine)
            return engine
        if self.waiting >= self.max_queue:
            raise QueueFull(f"all {len(self.engines)} workers are busy and {self.waiting} requests "
                            f"wait (the limit, --queue {self.max_queue}); retry shortly")
        fut = asyncio.get_running_loop().create_future()
        entry = (key, fut, [0])
        self._waiters.append(entry)
        try:
            return await fut
        except asyncio.CancelledError:
            if entry in self._waiters:
                self._waiters.remove(entry)
            if fut.done() and not fut.cancelled():
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


class Job:
    """One generation on one engine, in a thread of its own that owns the engine until the
    generation ends; its events ("piece", text), then ("done", Completion) or ("error", exc)
    arrive on an asyncio queue.  ``cancel()`` stops it at the next token (a prefill in progress
    finishes first); whatever happens the engine goes back to the pool when the thread ends."""

    def __init__(self, engine, opts: dict, release: Callable[[Any], None]):
        self.engine, self.opts, self._release = engine, opts, release
        self.events: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._cancel = threading.Event()
        self.finished = threading.Event()
        self.thread = threading.Thread(target=self._work, name="edge-reft-job", daemon=True)
        self.thread.start()

    def cancel(self) -> None:
        self._cancel.set()

    def _post(self, item: tuple[str, Any]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens any more
            self._loop.call_soon_threadsafe(self.events.put_nowait, item)

    def _work(self) -> None:
        try:
            gen = self.engine.generate(stream=True, **self.opts)
            try:
                for piece in gen:
                    if self._cancel.is_set():
                        break
                    self._post(("piece", piece))
            finally:
                gen.close()
            self._post(("done", gen.result))
        except BaseException as e:  # reported to the client; the engine stays usable
            self._post(("error", e))
        finally:
            self.finished.set()
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._release, self.engine)

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
