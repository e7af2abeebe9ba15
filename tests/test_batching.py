"""Continuous batching: several sequences, each with its own patches, in one llama.cpp batch.

The oracle is the one-sequence engine: a request decoded among others must give what it
gives alone, and a row must be edited by its own request's patch and no other."""
from __future__ import annotations

import numpy as np
import pytest

from edge_reft.errors import ReftError
from edge_reft.patch import random_patch
from edge_reft.runtime import Engine
from edge_reft.runtime.engine import Segment

PROMPTS = ["Name a fruit.", "What is the capital of Italy?", "Say something kind.", "Count to three.",
           "Give me a colour.", "What do cats eat?"]
SPECS = [(15, "l1", 4), (12, "l1", 4), (10, "f1+l1", 4), (20, "all", 2), (5, "f2+l2", 4)]


@pytest.fixture(scope="module")
def patches(engine_q4):
    return [random_patch(engine_q4.base, [spec], scale=8.0, seed=i + 1) for i, spec in enumerate(SPECS)]


@pytest.fixture(scope="module")
def batched(smol_q4):
    with Engine(smol_q4, slots=4, n_ctx=512, n_threads=2) as e:
        yield e


def requests(patches, n: int, max_tokens: int = 12) -> list[dict]:
    """Prompts and patches (None among them) in a mix, no two neighbours alike."""
    sets = [None, *patches]
    return [dict(prompt=PROMPTS[i % len(PROMPTS)], patch=sets[i % len(sets)], max_tokens=max_tokens)
            for i in range(n)]


def alone(engine, reqs: list[dict]) -> list[str]:
    return [engine.generate(**r, stream=False, cache="off").text for r in reqs]


def test_mixed_patches_in_one_batch_answer_as_alone(batched, engine_q4, patches):
    reqs = requests(patches, 10)  # more requests than slots: some wait and take freed slots
    got = batched.generate_many(reqs)
    assert [c.text for c in got] == alone(engine_q4, reqs)
    assert all(c.finish_reason in ("stop", "length") for c in got)


def test_a_row_gets_its_own_patch_and_no_other(smol_q4, patches):
    """Two sequences' prompts in one forward pass with different patches: each sequence's
    logits are those of its prompt run alone under its own patch, bit for bit, and differ
    from those under the other's patch (so the comparison can fail)."""
    a, b = patches[0], patches[3]  # l1 and all-positions
    with Engine(smol_q4, slots=2, n_ctx=256, n_threads=2, kv_f32=True) as e, \
            Engine(smol_q4, n_ctx=256, n_threads=2, kv_f32=True) as one:
        ta, tb = e.prompt_tokens(PROMPTS[0]), e.prompt_tokens(PROMPTS[1])
        pa, pb = e.patch_set(a), e.patch_set(b)
        with e._exclusive():
            la, lb = e._forward_batch([Segment(0, ta, 0, len(ta), pa, True), Segment(1, tb, 0, len(tb), pb, True)])
        want_a, want_b = one.logits(ta, a, last_only=True)[0], one.logits(tb, b, last_only=True)[0]
        crossed = one.logits(ta, b, last_only=True)[0]
    np.testing.assert_array_equal(la, want_a)  # bit for bit: each sequence has a KV stream of its own
    np.testing.assert_array_equal(lb, want_b)
    assert np.abs(crossed - want_a).max() > 0.5


@pytest.mark.parametrize("unified", [False, True])
def test_a_neighbours_patch_never_reaches_a_row(smol_q4, patches, unified):
    """The same two prompts in one pass, the neighbour with and without its patch: the first
    sequence's logits do not move at all (in both KV layouts: one stream per sequence, the CPU
    default, and one unified stream, the GPU default), the neighbour's do."""
    with Engine(smol_q4, slots=2, n_ctx=256, n_threads=2, kv_unified=unified) as e:
        ta, tb = e.prompt_tokens(PROMPTS[0]), e.prompt_tokens(PROMPTS[1])
        pa = e.patch_set(patches[0])

        def run(pb):
            for s in (0, 1):
                e._keep(0, s)
            with e._exclusive():
                return e._forward_batch([Segment(0, ta, 0, len(ta), pa, True),
                                         Segment(1, tb, 0, len(tb), e.patch_set(pb), True)])
        a0, b0 = run(None)
        a1, b1 = run(patches[3])
    np.testing.assert_array_equal(a0, a1)
    assert np.abs(b0 - b1).max() > 0.5


@pytest.mark.parametrize("unified", [False, True])
def test_a_prefix_no_patch_edits_is_taken_from_another_slot(smol_q4, engine_q4, patches, unified):
    """A second user with another last-position patch and the same prompt reuses the first
    one's cells for everything before the edited position, and still answers as alone."""
    from edge_reft.runtime.batching import Batcher, Request
    from edge_reft.runtime.sampling import sampling_params
    with Engine(smol_q4, slots=2, n_ctx=256, n_threads=2, kv_unified=unified) as e:
        toks = e.prompt_tokens(PROMPTS[2])
        got: dict = {}
        b = Batcher(e)
        with e._exclusive():
            for i, p in enumerate(patches[:2]):  # the second arrives while the first generates
                b.submit(Request(toks, e.patch_set(p), sampling_params(0.0, 1.0, 0, None), 10,
                                 on_done=lambda c, i=i: got.__setitem__(i, c)))
                b.step()
            b.run_all()
        out = [got[0], got[1]]
        assert b.stats.copied == len(toks) - 2  # all but the edited last token (and MIN_RECOMPUTED)
        assert [c.text for c in out] == alone(engine_q4, [dict(prompt=PROMPTS[2], patch=p, max_tokens=10)
                                                          for p in patches[:2]])
        assert out[1].reused_tokens == len(toks) - 2


def test_cancel_frees_the_slot_and_others_go_on(batched, patches):
    from edge_reft.runtime.batching import Batcher, Request
    from edge_reft.runtime.sampling import sampling_params
    b = Batcher(batched)
    done: dict = {}
    reqs = [Request(batched.prompt_tokens(PROMPTS[i]), batched.patch_set(patches[i]),
                    sampling_params(0.0, 1.0, 0, None), 30, on_done=lambda c, i=i: done.__setitem__(i, c))
            for i in range(3)]
    for r in reqs:
        b.submit(r)
    with batched._exclusive():
        for _ in range(3):
            b.step()
        b.cancel(reqs[1])
        b.run_all()
    assert done[1].finish_reason == "cancelled" and b.active == 0
    assert len(done[0].tokens) > len(done[1].tokens) or done[0].finish_reason == "stop"


def test_bad_requests_are_refused_by_name(batched, patches):
    with pytest.raises(ReftError, match="max_tokens"):
        batched.generate_many([dict(prompt="hi", max_tokens=-1)])
    with pytest.raises(ReftError, match="exceeds the context of 512 tokens"):
        batched.generate_many([dict(prompt="hi " * 600, max_tokens=4)])
    with pytest.raises(ReftError, match="slots"):
        Engine(batched.path, slots=0)


def test_a_malformed_patch_is_refused_naming_the_request(batched, tmp_path):
    """A bad patch file among the requests: its own error class (the file's problems listed),
    the request's index in front, and nothing generated."""
    from edge_reft.errors import ReftFormatError
    from hostile import CORPUS
    bad = tmp_path / "bad.reft"
    bad.write_bytes(CORPUS["nan-weight"][0]())
    with pytest.raises(ReftFormatError, match=r"^request 1: .*bad\.reft") as e:
        batched.generate_many([dict(prompt="hi", max_tokens=2), dict(prompt="hi", patch=bad, max_tokens=2)])
    assert e.value.problems
