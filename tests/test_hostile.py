"""A corpus of hostile `.reft` files, built byte by byte: each must be refused
cleanly (the right error, naming the field) quickly and in bounded memory."""
from __future__ import annotations

import tracemalloc

import pytest

import edge_reft
from edge_reft.reftfile import load_patch
from hostile import CORPUS, valid

MIB = 1 << 20


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 40


def test_valid_image_loads(tmp_path):
    """The baseline every hostile file is a mutation of must itself load."""
    p = tmp_path / "ok.reft"
    p.write_bytes(valid().bytes())
    patch = load_patch(p)
    assert patch.interventions[0].rank == 2 and str(patch.interventions[0].positions) == "f1+l1"


@pytest.mark.timeout(1, method="signal")
@pytest.mark.parametrize("name", sorted(CORPUS))
def test_hostile_file_is_refused(name, tmp_path):
    build, error, fragment = CORPUS[name]
    p = tmp_path / f"{name}.reft"
    p.write_bytes(build())
    tracemalloc.start()
    try:
        with pytest.raises(getattr(edge_reft, error)) as info:
            load_patch(p)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    msg = str(info.value)
    assert str(p) in msg, "the error must name the file"
    assert fragment in msg, f"expected {fragment!r} in: {msg}"
    assert peak < 4 * MIB + 2 * p.stat().st_size, f"peak {peak} bytes while rejecting"


@pytest.mark.timeout(1, method="signal")
def test_oversized_file_is_refused_before_reading(tmp_path):
    p = tmp_path / "big.reft"
    with open(p, "wb") as f:  # sparse: 16 MiB + 1 byte of a valid start
        f.write(valid().bytes())
        f.truncate(16 * MIB + 1)
    tracemalloc.start()
    try:
        with pytest.raises(edge_reft.ReftFormatError, match="exceeds the limit of 16777216"):
            load_patch(p)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MIB


def test_limit_can_be_raised(tmp_path):
    p = tmp_path / "ok.reft"
    data = valid().bytes()
    p.write_bytes(data)
    with pytest.raises(edge_reft.ReftFormatError, match="exceeds the limit"):
        load_patch(p, max_bytes=len(data) - 1)
    assert load_patch(p, max_bytes=len(data)).n_params > 0


def test_all_problems_reported_at_once(tmp_path):
    g = valid(count=2)
    g.set("reft.0.layer", 4, 99).set("reft.1.positions", 8, "q7").set("reft.1.component", 8, "mlp")
    p = tmp_path / "many.reft"
    p.write_bytes(g.bytes())
    with pytest.raises(edge_reft.ReftFormatError) as info:
        load_patch(p)
    fields = [prob.split(":")[0] for prob in info.value.problems]
    assert fields == ["reft.0.layer", "reft.1.component", "reft.1.positions"], info.value.problems


def test_missing_file_is_a_clean_error(tmp_path):
    with pytest.raises(edge_reft.ReftFormatError, match="cannot be read"):
        load_patch(tmp_path / "nope.reft")
    with pytest.raises(edge_reft.ReftFormatError, match="cannot be read"):
        load_patch(tmp_path)  # a directory
