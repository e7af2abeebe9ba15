"""Shared fixtures: the real SmolLM2 GGUF, its float32 twin, the HF reference model.

Artifacts derived from the models (the F32 GGUF, the HF folder) are cached
in EDGE_REFT_CACHE (default: .cache/ in the repository) and built once.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))  # tests/ helpers (hostile.py, ...)
os.environ.setdefault("EDGE_REFT_CACHE", str(ROOT / ".cache"))


@pytest.fixture(scope="session")
def smol_q4() -> Path:
    from edge_reft.models import default_model
    return default_model()


@pytest.fixture(scope="session")
def smol_f32(smol_q4) -> Path:
    """SmolLM2 with the Q4_1 weights dequantized to float32 (what PyTorch sees)."""
    from edge_reft.dequantize import dequantize_gguf
    from edge_reft.models import cache_dir
    out = cache_dir() / "models" / "SmolLM2-135M-Instruct.Q4_1-dequantized.F32.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        dequantize_gguf(smol_q4, out)
    return out


@pytest.fixture(scope="session")
def hf_smol(smol_q4):
    """The torch reference: SmolLM2 in transformers, float32, the same dequantized weights."""
    import torch
    from transformers import AutoModelForCausalLM
    from edge_reft.train.hf import hf_dir
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(hf_dir(smol_q4), dtype=torch.float32)
    return model.eval()


GATES = ("native", "python")  # the C eval callback and its pure-Python fallback


@pytest.fixture(scope="session")
def engines_f32(smol_f32):
    """llama.cpp on the F32 GGUF with an F32 KV cache (comparable to torch to float32
    rounding), once per gate."""
    from edge_reft.runtime import Engine
    engines = {g: Engine(smol_f32, n_ctx=512, kv_f32=True, gate=g) for g in GATES}
    yield engines
    for e in engines.values():
        e.close()


@pytest.fixture(scope="session")
def engines_q4(smol_q4):
    from edge_reft.runtime import Engine
    engines = {g: Engine(smol_q4, n_ctx=1024, gate=g) for g in GATES}
    yield engines
    for e in engines.values():
        e.close()


@pytest.fixture(scope="session")
def engine_q4(engines_q4):
    return engines_q4["native"]


@pytest.fixture(scope="session")
def gemma3_q4() -> Path:
    from edge_reft.models import gemma3
    return gemma3()
