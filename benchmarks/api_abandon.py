"""How long the Python API takes to serve a call after a stream was abandoned.

    python benchmarks/api_abandon.py [--rounds 7] [--model M]

The pattern that deadlocked 0.1: keep a stream, ``break`` out of it after its
first token, call ``engine.generate`` again in the same thread.  Timed from the
``break`` to the second call's return, against the anchor: the same second call
on an engine with nothing pending.  Rounds interleave the configurations, so
the difference is what the abandoned stream costs (its cancellation), and the
absolute figure is what a user waits.  Each call runs under a watchdog: a
deadlock ends the run with an error instead of hanging it.
"""
from __future__ import annotations

import argparse
import statistics
import threading
import time

from common import interleaved, table

FIRST, SECOND = "Count from one to twenty.", "Name a colour."


def watched(fn, limit: float = 60.0) -> float:
    box: dict = {}
    t = threading.Thread(target=lambda: box.setdefault("s", fn()), daemon=True)
    t.start()
    t.join(limit)
    if t.is_alive():
        raise SystemExit(f"the call did not return within {limit:.0f} s: the engine is deadlocked")
    return box["s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    from edge_reft.models import default_model
    from edge_reft.runtime import Engine
    engine = Engine(a.model or str(default_model()), n_ctx=512)

    def anchor() -> dict[str, float]:
        def run():
            t0 = time.perf_counter()
            engine.generate(SECOND, max_tokens=4, stream=False)
            return time.perf_counter() - t0
        return {"s": watched(run)}

    def abandoned(then: str):
        def config() -> dict[str, float]:
            def run():
                stream = engine.generate(FIRST, max_tokens=40)
                for _ in stream:
                    break  # kept, unfinished
                t0 = time.perf_counter()
                if then == "generate":
                    engine.generate(SECOND, max_tokens=4, stream=False)
                else:
                    engine.logits(engine.prompt_tokens(SECOND), last_only=True)
                s = time.perf_counter() - t0
                assert stream.result is not None and stream.result.finish_reason == "cancelled"
                return s
            return {"s": watched(run)}
        return config

    runs = interleaved({"anchor: generate, nothing pending": anchor,
                        "break out of a stream, then generate": abandoned("generate"),
                        "break out of a stream, then logits": abandoned("logits")}, a.rounds)
    base = statistics.median(runs["anchor: generate, nothing pending"]["s"])
    rows = [[name, statistics.median(r["s"]) * 1e3, max(r["s"]) * 1e3, statistics.median(r["s"]) / base]
            for name, r in runs.items()]
    engine.close()
    print(table(["pattern (second call timed)", "median ms", "max ms", "x anchor"], rows,
                title=f"abandoned streams, {a.rounds} rounds, second call: {SECOND!r} (4 tokens)"))


if __name__ == "__main__":
    main()
