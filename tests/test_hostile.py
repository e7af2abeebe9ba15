"""A corpus of hostile `.reft` files, built byte by byte: each must be refused
cleanly (the right error, naming the field) quickly and in bounded memory."""
from __future__ import annotations

import tracemalloc

import numpy as np
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


@pytest.mark.parametrize("itype", ["loreft", "noreft", "consreft", "lobireft", "direft", "nodireft"])
@pytest.mark.parametrize("positions", ["f1+l1", "f0+l3:-1"])
def test_valid_format2_images_load(itype, positions, tmp_path):
    """A hand-built format-2 image of every type (and a format-2 rule) loads, with the tensors
    its type stores, and computes its pyreft formula."""
    from edge_reft import loreft
    p = tmp_path / "ok.reft"
    p.write_bytes(valid(itype=itype, positions=positions, version=2).bytes())
    iv = load_patch(p).interventions[0]
    assert (iv.type, str(iv.positions)) == (itype, positions)
    assert (iv.weight is None) == (itype in ("consreft", "lobireft"))
    h = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    r, w, b = (x.astype(np.float64) if x is not None else None for x in (iv.rotate, iv.weight, iv.bias))
    delta = {"consreft": lambda: b - h @ r.T, "lobireft": lambda: np.broadcast_to(b, (3, 2)),
             "direft": lambda: h @ w.T + b, "nodireft": lambda: h @ w.T + b}.get(
        itype, lambda: h @ w.T + b - h @ r.T)()
    np.testing.assert_allclose(loreft.apply(itype, h, iv.rotate, iv.weight, iv.bias), h + delta @ r, atol=1e-5)


def test_version_1_files_stay_version_1(tmp_path):
    """A patch that uses nothing of format 2 is written as version 1 (old readers read it);
    one that does is written as version 2."""
    from edge_reft import reftfile
    p = tmp_path / "v1.reft"
    p.write_bytes(valid().bytes())
    patch = load_patch(p)
    assert patch.version == 1
    again = load_patch(reftfile.save_patch(patch, tmp_path / "again.reft"))
    assert again.version == 1 and again.interventions[0].rotate.tobytes() == patch.interventions[0].rotate.tobytes()
    p2 = tmp_path / "v2.reft"
    p2.write_bytes(valid(itype="direft", version=2).bytes())
    assert load_patch(reftfile.save_patch(load_patch(p2), tmp_path / "v2b.reft")).version == 2


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
