"""The `.reft` format: round trips, an independent writer, immutability, mismatch."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import edge_reft
from edge_reft import spec
from edge_reft.loreft import orthonormality_error, random_orthonormal
from edge_reft.patch import BaseModel, Intervention, Patch, random_patch
from edge_reft.reftfile import decode_tensor, encode_bf16, load_patch, save_patch
from hostile import FP

BASE = BaseModel("llama", 64, 6, FP, "synthetic-64")

ROUND_TRIPS = [  # (n_embd, [(layer, positions, rank)], dtype)
    (64, [(0, "l1", 1)], spec.GGML_F32),
    (64, [(5, "f1+l1", 4)], spec.GGML_F32),
    (64, [(2, "all", 8), (2, "l3", 2)], spec.GGML_F32),
    (64, [(1, "f2", 3), (4, "f3+l3", 16)], spec.GGML_F16),
    (64, [(3, "l1", 4)], spec.GGML_BF16),
    (576, [(15, "l1", 4), (12, "f1+l1", 8), (29, "all", 1)], spec.GGML_F32),
    (576, [(15, "f5+l7", 32)], spec.GGML_F16),
    (576, [(0, "l2", 64)], spec.GGML_BF16),
]


def _stored(a: np.ndarray, dtype: int) -> np.ndarray:
    """What a float32 array reads back as after storage in ``dtype``."""
    if dtype == spec.GGML_F16:
        return a.astype(np.float16).astype(np.float32)
    if dtype == spec.GGML_BF16:
        return decode_tensor(encode_bf16(a).tobytes(), spec.GGML_BF16, a.shape)
    return a


@pytest.mark.parametrize("n_embd,specs,dtype", ROUND_TRIPS)
def test_round_trip(tmp_path, n_embd, specs, dtype):
    base = BaseModel("llama", n_embd, 30, FP, "synthetic")
    p = random_patch(base, specs, seed=n_embd)
    p = Patch(base, tuple(Intervention(iv.layer, iv.positions, iv.rotate, iv.weight, iv.bias, dtype=dtype)
                          for iv in p.interventions), name="rt", description="round trip",
              provenance={"steps": 12, "loss": 0.25, "data": "x.jsonl", "layers": [15, 12], "ok": True})
    out = save_patch(p, tmp_path / "p.reft")
    q = load_patch(out, model=base)
    assert (q.name, q.description, q.base) == ("rt", "round trip", base)
    assert dict(q.provenance) == {"steps": 12, "loss": 0.25, "data": "x.jsonl", "layers": [15, 12], "ok": True}
    assert len(q.interventions) == len(specs)
    for a, b in zip(p.interventions, q.interventions):
        assert (a.layer, str(a.positions), a.rank, a.type, a.component, a.dtype) == \
               (b.layer, str(b.positions), b.rank, b.type, b.component, b.dtype)
        for role in ("rotate", "weight", "bias"):
            np.testing.assert_array_equal(getattr(b, role), _stored(getattr(a, role), dtype))
            assert getattr(b, role).dtype == np.float32


def test_records_are_immutable(tmp_path):
    p = random_patch(BASE, [(1, "l1", 2)])
    with pytest.raises(ValueError):
        p.interventions[0].weight[0, 0] = 1.0
    with pytest.raises(AttributeError):
        p.interventions[0].layer = 3  # frozen dataclass
    with pytest.raises(TypeError):
        p.provenance["x"] = 1


def test_bf16_rounds_to_nearest_even():
    x = np.array([1.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -2.5, 3.4e38], dtype=np.float32)
    back = decode_tensor(encode_bf16(x).tobytes(), spec.GGML_BF16, x.shape)
    np.testing.assert_array_equal(back[:4], [1.0, 1.0, 1.0 + 2 ** -6, -2.5])


def test_writer_is_atomic_and_leaves_no_temp(tmp_path):
    good = random_patch(BASE, [(1, "l1", 2)])
    target = tmp_path / "user.reft"
    save_patch(good, target)
    before = target.read_bytes()

    class Boom(Intervention):  # fails half-way through writing the tensors
        @property
        def bias(self):
            raise RuntimeError("disk full")

    bad = Patch.__new__(Patch)
    object.__setattr__(bad, "__dict__", dict(good.__dict__))
    object.__setattr__(bad, "interventions", (good.interventions[0], object.__new__(Boom)))
    with pytest.raises(Exception):
        save_patch(bad, target)
    assert target.read_bytes() == before
    assert [f.name for f in tmp_path.iterdir()] == ["user.reft"]


def test_invalid_patch_cannot_be_built():
    r = random_orthonormal(2, 64, np.random.default_rng(0))
    with pytest.raises(edge_reft.ReftFormatError) as e:
        Patch(BASE, (Intervention(9, "l1", r * 2, r, np.zeros(2)),))
    text = str(e.value)
    assert "reft.0.layer: 9 is outside" in text and "reft.0.rotate: rows are not orthonormal" in text
    with pytest.raises(edge_reft.PositionError):
        Intervention(1, "l", r, r, np.zeros(2))


def test_noreft_needs_no_orthonormal_rows(tmp_path):
    rng = np.random.default_rng(3)
    p = Patch(BASE, (Intervention(2, "l1", rng.standard_normal((3, 64)), rng.standard_normal((3, 64)),
                                  np.zeros(3), type="noreft"),))
    q = load_patch(save_patch(p, tmp_path / "n.reft"))
    assert q.interventions[0].type == "noreft" and orthonormality_error(q.interventions[0].rotate) > 0.1


INDEPENDENT_WRITER = r'''
import sys, numpy as np, gguf
from gguf import GGUFValueType as T
d, r, path, fp = 64, 3, sys.argv[1], sys.argv[2]
w = gguf.GGUFWriter(path, "llama")  # follows FORMAT.md, nothing of edge_reft
for k, v, t in [("general.type", "adapter", T.STRING), ("adapter.type", "reft", T.STRING),
                ("reft.version", 1, T.UINT32), ("reft.base.n_embd", d, T.UINT32),
                ("reft.base.n_layer", 6, T.UINT32), ("reft.base.fingerprint", fp, T.STRING),
                ("reft.base.name", "independent", T.STRING), ("reft.count", 1, T.UINT32),
                ("reft.0.type", "loreft", T.STRING), ("reft.0.layer", 4, T.UINT32),
                ("reft.0.component", "block_output", T.STRING), ("reft.0.positions", "f1+l1", T.STRING),
                ("reft.0.rank", r, T.UINT32), ("reft.train.steps", 7, T.UINT32)]:
    w.add_key_value(k, v, t)
q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((d, r)))
w.add_tensor("reft.0.rotate", q.T.astype(np.float16))
w.add_tensor("reft.0.weight", np.full((r, d), 0.5, np.float16))
w.add_tensor("reft.0.bias", np.arange(r, dtype=np.float16))
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
'''


def test_reads_file_from_independent_gguf_py_writer(tmp_path):
    path = tmp_path / "indep.reft"
    subprocess.run([sys.executable, "-c", INDEPENDENT_WRITER, str(path), FP], check=True)
    p = load_patch(path, model=BASE)
    iv = p.interventions[0]
    assert (iv.layer, str(iv.positions), iv.rank, iv.dtype) == (4, "f1+l1", 3, spec.GGML_F16)
    np.testing.assert_array_equal(iv.bias, [0, 1, 2])
    assert p.provenance == {"steps": 7}
    out = subprocess.run([sys.executable, "-m", "edge_reft", "inspect", str(path), "--json"],
                         capture_output=True, text=True, check=True)
    rec = json.loads(out.stdout)
    assert rec["reft.0.positions"] == "f1+l1" and rec["reft.base.name"] == "independent"
    assert rec["reft.0.dtype"] == "F16" and rec["parameters"] == 3 * 64 * 2 + 3


def test_our_files_read_by_gguf_py(tmp_path):
    import gguf
    p = random_patch(BASE, [(1, "l1", 2), (3, "all", 5)])
    r = gguf.GGUFReader(save_patch(p, tmp_path / "x.reft"))
    assert r.get_field("adapter.type").contents() == "reft"
    assert r.get_field("reft.1.positions").contents() == "all"
    t = {t.name: t for t in r.tensors}
    np.testing.assert_array_equal(np.asarray(t["reft.1.weight"].data), p.interventions[1].weight)


def test_mismatched_base_is_refused_with_hint(tmp_path):
    p = save_patch(random_patch(BASE, [(1, "l1", 2)]), tmp_path / "a.reft")
    other = BaseModel("llama", 64, 6, "cd" * 32, "other")
    with pytest.raises(edge_reft.PatchMismatchError, match="--allow-mismatch"):
        load_patch(p, model=other)
    with pytest.warns(UserWarning, match="applying it anyway"):
        load_patch(p, model=other, allow_mismatch=True)
    small = BaseModel("llama", 32, 6, "cd" * 32, "small")
    with pytest.raises(edge_reft.PatchMismatchError, match="cannot be applied at all"):
        load_patch(p, model=small, allow_mismatch=True)
