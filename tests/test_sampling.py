"""The shared sampler: penalties and min_p by hand, and on the real model (a greedy loop
broken by a repeat penalty, through both the Python API and the CLI's flags)."""
from __future__ import annotations

import numpy as np
import pytest

from edge_reft.errors import ReftError
from edge_reft.runtime.sampling import Sampler, SamplingParams, penalize, sampling_params


def test_penalties_by_hand():
    logits = np.array([2.0, -1.0, 0.5, 3.0])
    history = [0, 0, 1, 3]
    p = SamplingParams(repeat_penalty=2.0, frequency_penalty=0.1, presence_penalty=0.3)
    got = penalize(logits, history, p)
    # token 0: seen twice, positive: 2/2 - 2*0.1 - 0.3; token 1: negative: -1*2 - 0.1 - 0.3
    assert got.tolist() == pytest.approx([1.0 - 0.2 - 0.3, -2.0 - 0.1 - 0.3, 0.5, 1.5 - 0.1 - 0.3])
    assert logits.tolist() == [2.0, -1.0, 0.5, 3.0]  # the caller's logits untouched
    last2 = penalize(logits, history, SamplingParams(presence_penalty=1.0, penalty_last_n=2))
    assert last2.tolist() == [2.0, -2.0, 0.5, 2.0]   # only tokens 1 and 3 are in the window


def test_greedy_with_penalties_moves_off_a_repeated_token():
    logits = np.array([5.0, 4.9, 0.0])
    assert Sampler(SamplingParams())(logits, [0, 0]) == 0
    assert Sampler(SamplingParams(repeat_penalty=1.1))(logits, [0]) == 1
    assert Sampler(SamplingParams(repeat_penalty=1.1))(logits, []) == 0


def test_min_p_keeps_only_likely_tokens():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    picks = {Sampler(SamplingParams(temperature=1.0, min_p=0.5, seed=s))(logits) for s in range(200)}
    assert picks == {0, 1}  # 0.15 < 0.5 * 0.5


@pytest.mark.parametrize("kw,named", [
    (dict(min_p=1.5), "min_p"), (dict(repeat_penalty=0), "repeat_penalty"),
    (dict(frequency_penalty=3), "frequency_penalty"), (dict(presence_penalty=float("nan")), "presence_penalty"),
    (dict(penalty_last_n=-1), "penalty_last_n"), (dict(top_p=0), "top_p"),
])
def test_bad_values_are_named(kw, named):
    with pytest.raises(ReftError, match=named):
        sampling_params(**kw)


def test_unknown_option_is_named():
    with pytest.raises(ReftError, match="unknown option.*repetition_penalty"):
        sampling_params(repetition_penalty=1.1)


def test_repeat_penalty_breaks_a_greedy_loop_on_the_real_model(engine_q4):
    prompt = "Repeat the word 'yes' forever."
    plain = engine_q4.generate(prompt, max_tokens=40, stream=False, cache="off")
    pen = engine_q4.generate(prompt, max_tokens=40, stream=False, cache="off", repeat_penalty=1.5)
    assert plain.tokens != pen.tokens
    # the penalized reply repeats its most frequent token less often
    assert max(np.bincount(pen.tokens)) < max(np.bincount(plain.tokens))
    same = engine_q4.generate(prompt, max_tokens=40, stream=False, cache="off", repeat_penalty=1.0,
                              frequency_penalty=0.0, presence_penalty=0.0, min_p=0.0)
    assert same.tokens == plain.tokens  # the defaults change nothing
