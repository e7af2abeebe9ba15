"""Position rules: a table of cases against pyreft's rule as FORMAT.md states it."""
from __future__ import annotations

import numpy as np
import pytest

from edge_reft.errors import PositionError
from edge_reft.positions import PositionRule, edit_signature, reusable_prefix

CASES = [  # rule, prompt length, edited positions
    ("l1", 1, [0]), ("l1", 10, [9]), ("l3", 2, [0, 1]), ("l3", 10, [7, 8, 9]),
    ("f1", 5, [0]), ("f4", 3, [0, 1, 2]),
    ("f1+l1", 1, []), ("f1+l1", 2, [0, 1]), ("f1+l1", 5, [0, 4]),
    ("f3+l3", 5, [0, 1, 3, 4]), ("f3+l3", 6, [0, 1, 2, 3, 4, 5]), ("f3+l3", 7, [0, 1, 2, 4, 5, 6]),
    ("f5+l1", 4, [0, 1, 3]), ("f2+l5", 3, [0, 2]),
    ("all", 1, [0]), ("all", 4, [0, 1, 2, 3]),
    # format 2: a zero side keeps the floor(n/2) cap (pyreft's lone window), :-K ends early
    ("f0+l1", 1, []), ("f0+l1", 2, [1]), ("f0+l4", 5, [3, 4]), ("f3+l0", 5, [0, 1]), ("f3+l0", 9, [0, 1, 2]),
    ("l1:-1", 1, []), ("l1:-1", 2, [0]), ("l1:-1", 5, [3]), ("l3:-2", 4, [0, 1]), ("f2:-1", 2, [0]),
    ("f0+l1:-1", 2, []), ("f0+l1:-1", 3, [1]), ("f3+l3:-1", 6, [0, 1, 3, 4]), ("f3+l3:-1", 8, [0, 1, 2, 4, 5, 6]),
]


@pytest.mark.parametrize("rule,n,want", CASES)
def test_select(rule, n, want):
    r = PositionRule.parse(rule)
    got = r.select(n)
    assert got.tolist() == want
    assert str(r) == rule
    f, l = r.windows(n)
    if r.first and r.last:  # both windows: each capped at floor(n/2), never overlapping
        assert f <= n // 2 and l <= n // 2
    assert len(set(got.tolist())) == len(got)  # a position is edited once


@pytest.mark.parametrize("bad", ["", "l", "l0", "f0", "f0+l0", "f1+", "+l1", "l1+f1", "f1l1", "L1", " l1",
                                 "l01", "f1+l1+l2", "al", "ALL", "l1234567", "l-1", "l1.5", "all:-1",
                                 "l1:-0", "l1:-01", "l1:1", "l1:--1", "l1:-", "l1\n", "f00+l1"])
def test_parse_rejects(bad):
    with pytest.raises(PositionError, match="expected"):
        PositionRule.parse(bad)


def test_versions():
    assert [PositionRule.parse(r).version for r in ("l1", "f3+l3", "all", "f0+l1", "l1:-1", "f3+l0")] == \
        [1, 1, 1, 2, 2, 2]


@pytest.mark.parametrize("rule", ["l1", "f2+l2", "all", "f0+l1:-1"])
def test_empty_prompt_is_an_error(rule):
    with pytest.raises(PositionError, match="empty"):
        PositionRule.parse(rule).select(0)


def test_signature_and_reuse_on_multi_turn():
    l2 = PositionRule.parse("l2")
    turn1 = list(range(10))
    sig1 = edit_signature([l2], n_prompt=10, n_total=14)  # prompt 10 + 4 generated
    assert np.flatnonzero(sig1).tolist() == [8, 9]
    turn2 = turn1 + [100, 101, 102, 103] + [7, 7, 7]  # history + new user message
    sig2 = edit_signature([l2], n_prompt=len(turn2), n_total=len(turn2))
    # position 8 was edited in turn 1 and must not be now: recompute from 8
    assert reusable_prefix(turn1 + [100, 101, 102, 103], sig1, turn2, sig2) == 8
    # an all-positions patch keeps the whole shared prefix
    a = PositionRule.parse("all")
    s1 = edit_signature([a], 10, 14)
    s2 = edit_signature([a], 17, 17)
    assert reusable_prefix(turn1 + [100, 101, 102, 103], s1, turn2, s2) == 14
    # a different token stops reuse there; an f-rule keeps its prefix
    f1 = PositionRule.parse("f1")
    assert reusable_prefix([1, 2, 3], edit_signature([f1], 3, 3), [1, 2, 9, 9],
                           edit_signature([f1], 4, 4)) == 2


def test_across_patch_sets_only_unedited_positions_are_kept():
    """Bit i names intervention i of *its own* set, so equal signatures from two different
    sets prove nothing: only positions that neither set edits may be shared."""
    toks = list(range(12))
    l1, l2, f1 = (PositionRule.parse(r) for r in ("l1", "l2", "f1+l1"))
    old, new = edit_signature([l1], 10, 12), edit_signature([l1], 12, 12)
    assert reusable_prefix(toks[:10] + [50, 51], old, toks, new) == 9      # same patch: up to its edit
    assert reusable_prefix(toks[:10] + [50, 51], old, toks, new, same_edits=False) == 9
    assert reusable_prefix(toks, new, toks, edit_signature([l2], 12, 12), same_edits=False) == 10
    assert reusable_prefix(toks, new, toks, edit_signature([f1], 12, 12), same_edits=False) == 0
    assert reusable_prefix(toks, new, toks, new, same_edits=False) == 11   # same bits, other patch
    assert reusable_prefix(toks, new, toks, np.zeros(12, np.uint64), same_edits=False) == 11


def test_signature_bits_per_intervention():
    rules = [PositionRule.parse(r) for r in ("f1", "l1", "all")]
    sig = edit_signature(rules, n_prompt=3, n_total=5)
    assert sig[:, 0].tolist() == [0b101, 0b100, 0b110, 0b100, 0b100]


@pytest.mark.parametrize("count", [63, 64, 65, 1024])
def test_signatures_name_every_intervention_the_format_allows(count):
    """One limit (spec.MAX_INTERVENTIONS): a signature has a bit for each of up to 1024
    interventions, and reuse stops where any one of them, even the last, edits."""
    from edge_reft import spec
    assert count <= spec.MAX_INTERVENTIONS
    rules = [PositionRule.parse("f1")] * (count - 1) + [PositionRule.parse("l1")]
    sig = edit_signature(rules, 10, 10)
    assert sig.shape == (10, (count + 63) // 64)
    last_word, last_bit = divmod(count - 1, 64)
    assert np.flatnonzero(sig[:, last_word] & np.uint64(1 << last_bit)).tolist() == [9]
    toks = list(range(10))
    longer = edit_signature(rules, 12, 12)   # two more tokens: the l1 edit moves from 9 to 11
    assert reusable_prefix(toks, sig, toks + [5, 6], longer) == 9
    assert reusable_prefix(toks, sig, toks + [5, 6], longer, same_edits=False) == 0


# ---- pyreft's own rule ---------------------------------------------------------------------

def pyreft_locations(positions: str, last_position: int, share_weights: bool, num_interventions: int):
    """pyreft/dataset.py get_intervention_locations (pyreft 0.1.0), transcribed; pad_mode
    "first" pads with -1 (a masked pad token at generation, a no-op)."""
    first_n = last_n = 0
    if "+" in positions:
        first_n, last_n = int(positions.split("+")[0].strip("f")), int(positions.split("+")[1].strip("l"))
    elif "f" in positions:
        first_n = int(positions.strip("f"))
    else:
        last_n = int(positions.strip("l"))
    _first_n, _last_n = first_n, last_n
    first_n, last_n = min(last_position // 2, _first_n), min(last_position // 2, _last_n)
    pad_amount = (_first_n - first_n) + (_last_n - last_n)
    if share_weights or (first_n == 0 or last_n == 0):
        return [list(range(first_n)) + list(range(last_position - last_n, last_position))
                + [-1] * pad_amount] * num_interventions
    left = list(range(first_n)) + [-1] * (_first_n - first_n)
    right = list(range(last_position - last_n, last_position)) + [-1] * (_last_n - last_n)
    return [left] * (num_interventions // 2) + [right] * (num_interventions // 2)


@pytest.mark.parametrize("convention,shift", [("end", 0), ("end-1", 1)])
@pytest.mark.parametrize("positions", ["f1", "l1", "f3", "l4", "f1+l1", "f3+l3", "f2+l5"])
@pytest.mark.parametrize("share", [False, True])
def test_converted_rules_edit_what_pyreft_edits(convention, shift, positions, share):
    """For every prompt length, each converted rule selects exactly pyreft's locations
    (pads aside), tied or untied, under both dataset conventions."""
    from edge_reft.converters.pyreft import pyreft_rules
    untied = "+" in positions and not share
    rules = pyreft_rules(positions, untied, convention)
    for n in range(1, 15):
        want = pyreft_locations(positions, n - shift, share, 2 if untied else 1)
        got = [r.select(n).tolist() for r in rules]
        assert got == [sorted({p for p in w if p >= 0}) for w in want], (positions, n)
