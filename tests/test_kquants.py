"""K-quant dequantizers in torch equal gguf-py's numpy code bit for bit.

Random blocks use every byte pattern for the quants and scales; the float16
super-block scales are random bit patterns too (subnormals, negatives, up to
65504), only NaN/inf excluded, so a reordered multiplication shows up in the
last bit.  The Gemma 3 Q4_K_M file checks the blocks llama-quantize writes.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from edge_reft.train import ggufq, kquants

T = gguf.GGMLQuantizationType
# type -> byte offsets of its float16 fields (d, and dmin where it has one)
F16_FIELDS = {T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}


def random_blocks(qtype: T, rows: int, blocks_per_row: int, seed: int) -> np.ndarray:
    """(rows, bytes) of random blocks whose float16 fields are finite random halves."""
    nbytes = gguf.GGML_QUANT_SIZES[qtype][1]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows * blocks_per_row, nbytes), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        bits = rng.integers(0, 1 << 16, rows * blocks_per_row, dtype=np.uint16)
        bits[(bits & 0x7C00) == 0x7C00] &= 0xBFFF  # exponent 31 (inf/NaN) -> 15
        raw[:, off:off + 2] = bits.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


def assert_bit_exact(raw: np.ndarray, qtype: T) -> None:
    rows, cols = raw.shape[0], raw.shape[1] // gguf.GGML_QUANT_SIZES[qtype][1] * kquants.QK_K
    ref = gguf.quants.dequantize(raw, qtype).astype(np.float32, copy=False).reshape(rows, cols)
    ours = ggufq.dequantize(torch.from_numpy(raw.copy()), int(qtype), (rows, cols))
    assert ours.dtype == torch.float32 and tuple(ours.shape) == (rows, cols)
    mismatched = np.flatnonzero(ours.numpy().view(np.uint32) != ref.view(np.uint32))
    assert mismatched.size == 0, f"{qtype.name}: {mismatched.size} of {ref.size} values differ"


def test_block_sizes_match_gguf():
    for qtype, (nbytes, _) in kquants.KQUANTS.items():
        assert gguf.GGML_QUANT_SIZES[T(qtype)] == (kquants.QK_K, nbytes)
    assert set(F16_FIELDS) == {T(q) for q in kquants.KQUANTS}


@pytest.mark.parametrize("qtype", list(F16_FIELDS), ids=lambda q: q.name)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_blocks_bit_exact(qtype, seed):
    assert_bit_exact(random_blocks(qtype, rows=16, blocks_per_row=4, seed=seed), qtype)


@pytest.mark.parametrize("qtype", list(F16_FIELDS), ids=lambda q: q.name)
def test_kquants_never_fall_back_to_gguf_py(qtype, monkeypatch):
    def refuse(*_):
        raise AssertionError("gguf-py's numpy dequantizer was called")
    monkeypatch.setattr(gguf.quants, "dequantize", refuse)
    raw = torch.from_numpy(random_blocks(qtype, rows=2, blocks_per_row=1, seed=3))
    assert torch.isfinite(ggufq.dequantize(raw, int(qtype), (2, kquants.QK_K))).all()


def test_gemma3_q4_k_m_tensors_bit_exact():
    """Every K-quant matrix of the real file.  Located with edge-reft's own GGUF scanner (what
    training reads; gguf.GGUFReader spends ~40 s parsing this file's 262k-token vocabulary)."""
    from edge_reft.fingerprint import MODEL_CHECK_LIMITS
    from edge_reft.ggufscan import read_metadata
    from edge_reft.models import gemma3
    path = gemma3()
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    checked: dict[T, int] = {}
    for t in read_metadata(path, MODEL_CHECK_LIMITS).tensors:
        if t.ggml_type in kquants.KQUANTS:
            assert_bit_exact(np.array(mm[t.offset:t.offset + t.nbytes]).reshape(t.shape[0], -1),
                             T(t.ggml_type))
            checked[T(t.ggml_type)] = checked.get(T(t.ggml_type), 0) + 1
    # Q4_K_M: Q4_K for attn_output and most ffn_down, Q6_K for the rest of ffn_down
    assert checked == {T.Q4_K: 27, T.Q6_K: 9}
