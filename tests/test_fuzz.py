"""Fuzzers for the two readers users feed files to: `.reft` and JSON Lines (issue 14).

Every mutated file must give a valid Patch or a ReftError, never another exception; every
valid JSONL record, whatever its text holds, must read back as written.  Bounded
(max_examples, no deadline) so the file runs in seconds."""
from __future__ import annotations

import json
import os
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_reft.dataset import read_jsonl
from edge_reft.errors import ReftError
from edge_reft.patch import Patch
from edge_reft.reftfile import load_patch
from hostile import valid

SEEDS = [valid().bytes(), valid(count=2, dtype="F16", positions="l3").bytes()]
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TMP = tempfile.mkdtemp(prefix="edge-reft-fuzz-")


def _write(data: bytes, name: str) -> str:
    path = os.path.join(TMP, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


@st.composite
def mutated(draw) -> bytes:
    b = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["set", "flip", "cut", "insert", "u64"]))
        at = draw(st.integers(0, max(len(b) - 1, 0)))
        if op == "set" and b:
            b[at] = draw(st.integers(0, 255))
        elif op == "flip" and b:
            b[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del b[at:at + draw(st.integers(1, 64))]
        elif op == "insert":
            b[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "u64" and len(b) >= at + 8:  # a count or length turned extreme
            b[at:at + 8] = draw(st.sampled_from([2 ** 63, 2 ** 64 - 1, 2 ** 32, 0])).to_bytes(8, "little")
    return bytes(b)


@FAST
@given(mutated())
def test_mutated_reft_files_load_or_raise_reft_error(data):
    path = _write(data, "m.reft")
    try:
        patch = load_patch(path)
    except ReftError:
        return
    assert isinstance(patch, Patch) and patch.interventions


TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40) | st.sampled_from(
    ["\u2028", "a\u2029b", "\x85", "\r", "line\u2028break", "\x00", "\ufeff"])


@FAST
@given(st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=5), st.booleans())
def test_valid_jsonl_reads_back_as_written(pairs, ascii_only):
    lines = [json.dumps({"prompt": p, "response": r}, ensure_ascii=ascii_only) for p, r in pairs]
    path = _write(("\n".join(lines) + "\n").encode("utf-8"), "ok.jsonl")
    got = read_jsonl(path)
    assert got == [([{"role": "user", "content": p}], r) for p, r in pairs]


@FAST
@given(st.binary(max_size=300) | st.lists(TEXT, max_size=6).map(lambda xs: "\n".join(xs).encode("utf-8")))
def test_any_jsonl_bytes_read_or_raise_reft_error(data):
    path = _write(data, "any.jsonl")
    try:
        read_jsonl(path)
    except ReftError:
        pass


def test_raw_line_separators_inside_strings_load(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a\u2028b\u2029c\x85d", "response": "ok"}\n', encoding="utf-8")
    assert read_jsonl(p) == [([{"role": "user", "content": "a\u2028b\u2029c\x85d"}], "ok")]


def test_ggml_block_table_is_gguf_pys():
    gguf = pytest.importorskip("gguf")
    from edge_reft.ggufscan import GGML_BLOCKS
    assert GGML_BLOCKS == {int(t): tuple(v) for t, v in gguf.constants.GGML_QUANT_SIZES.items()}
