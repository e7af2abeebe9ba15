"""The Python API as an embedded app uses it: streams it abandons cannot hang it."""
from __future__ import annotations

import threading


def _in_thread(fn, timeout: float = 120.0):
    """Run ``fn`` in a worker thread; return its result, or fail if it never finishes (a
    deadlock would otherwise hang the suite)."""
    box: dict = {}
    t = threading.Thread(target=lambda: box.setdefault("r", fn()), daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "the call never returned: the engine is deadlocked"
    return box["r"]


def test_breaking_out_of_a_stream_then_generating_again_does_not_deadlock(engine_q4):
    def pattern():
        stream = engine_q4.generate("Count from one to twenty.", max_tokens=40)
        for _ in stream:
            break  # the stream is kept, unfinished, holding the engine
        again = engine_q4.generate("Name a colour.", max_tokens=4, stream=False)
        return stream, again

    stream, again = _in_thread(pattern)
    assert stream.result is not None and stream.result.finish_reason == "cancelled"
    fresh = engine_q4.generate("Name a colour.", max_tokens=4, stream=False)
    assert again.tokens == fresh.tokens and again.finish_reason in ("stop", "length")


def test_scoring_after_an_abandoned_stream_does_not_deadlock(engine_q4):
    def pattern():
        stream = engine_q4.generate("Tell me a story.", max_tokens=20)
        next(stream)
        return engine_q4.logits(engine_q4.prompt_tokens("Hi"), last_only=True)

    assert _in_thread(pattern).shape[0] == 1


def test_printing_a_generation_prints_its_text(engine_q4):
    gen = engine_q4.generate("Name a fruit.", max_tokens=6)
    text = str(gen)
    assert text and text == gen.result.text == engine_q4.generate("Name a fruit.", max_tokens=6, stream=False).text
