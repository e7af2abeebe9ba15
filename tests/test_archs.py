"""Every architecture users run, as a tiny random-weight GGUF made by llama.cpp's own
converter and quantizer (tests/shapes.py): llama (Llama 3: GQA, rope theta 500k, tied
and untied head), mistral, qwen2 (q/k/v biases), qwen3 (q/k norms), gemma2 (soft-capping,
four norms a block), gemma3, phi3 (fused qkv and gate_up).

- runtime parity: llama.cpp on the F32 GGUF, a patch applied in its eval callback,
  equals transformers on the same weights with the patch as a forward hook; an
  identity patch is bit-exact;
- training parity: the GGUF backbone (the file's own Q4_K_M blocks, nothing
  materialized in float32) computes exactly what transformers computes on the same
  file dequantized; a patch trained on it loads and runs in llama.cpp;
- an architecture training cannot map is refused by name, before any work.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import shapes
from edge_reft.errors import ReftError
from edge_reft.patch import identity, random_patch
from edge_reft.runtime import Engine
from edge_reft.train.hf import reference_logits

ARCHS = list(shapes.TINY)
PROMPT = "Tell me about the moon and its phases."
GGUF_ARCH = {"mistral": "llama", "llama-untied": "llama"}  # llama.cpp converts Mistral as llama


def _hf(folder):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.mark.parametrize("arch", ARCHS + list(shapes.OTHER))
def test_runtime_parity(arch):
    f32 = shapes.gguf(arch, "F32")
    with Engine(f32, n_ctx=256, kv_f32=True) as e:
        assert e.base.architecture == GGUF_ARCH.get(arch, arch)
        toks = e.prompt_tokens(PROMPT)
        n = e.base.n_layer
        patch = random_patch(e.base, [(0, "f2+l2", 4), (n - 1, "all", 2), (1, "l1", 8)], scale=4.0, seed=7)
        hf = _hf(shapes.hf_folder(arch))
        ref = reference_logits(hf, toks, [patch])
        plain = reference_logits(hf, toks, [])
        assert np.abs(ref - plain).max() > 0.05, "the patch must change the logits for the test to mean anything"
        got = e.logits(toks, patch)
        err, gap = np.abs(got - ref).max(), np.abs(e.logits(toks) - plain).max()
        # the kernels' own gap without a patch: ~1e-6, but ~5e-4 for Gemma, whose GELU ggml's
        # CPU backend computes from a float16 table; the patch may add at most 1e-4 to it
        assert gap < 1e-3 and err <= gap + 1e-4, (arch, err, gap)
        np.testing.assert_array_equal(e.logits(toks, identity(e.base, 1, "all")), e.logits(toks))


@pytest.mark.parametrize("arch", ARCHS)
def test_training_parity_and_the_patch_runs(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    from edge_reft.tasks import write_jsonl
    from edge_reft.train import TrainConfig, train
    from edge_reft.train.backbone import load_backbone
    from edge_reft.train.ggufq import GGUFLinear
    q = shapes.gguf(arch, "Q4_K_M")
    bb = load_backbone(q)
    assert not any(p.is_meta for p in bb.model.parameters())
    assert all(isinstance(m, GGUFLinear) for n, m in bb.model.named_modules() if n.endswith("_proj"))
    # transformers' own dequantization of the file, into the same config (its GGUF reader
    # misses Qwen3's head size; the backbone reads it from the file)
    ref = AutoModelForCausalLM.from_pretrained(q.parent, gguf_file=q.name, config=bb.model.config,
                                               dtype=torch.float32).eval()
    ids = torch.tensor([[1, 57, 300, 12, 900, 4, 77, 1000]])
    with torch.no_grad():
        assert torch.equal(bb.model(ids).logits, ref(ids).logits), arch
    data = write_jsonl([{"prompt": f"What is {i} + {i}?", "response": str(2 * i)} for i in range(4)],
                       tmp_path / "d.jsonl")
    patch = train(q, data, tmp_path / "p.reft", TrainConfig(layers=(1,), rank=2, batch_size=2, max_steps=2,
                                                           holdout=0), progress=False)
    assert np.isfinite(patch.provenance["final_loss"])
    with Engine(q, n_ctx=256) as e:
        out = e.generate("What is 3 + 3?", patch=e.load_patch(tmp_path / "p.reft"), max_tokens=4, stream=False)
        assert out.finish_reason in ("stop", "length")


def test_an_architecture_training_cannot_map_is_refused_by_name(tmp_path):
    """Granite runs in llama.cpp (its patch edits apply), but transformers has no GGUF mapping
    for it: training refuses with the architecture's name, before reading any data."""
    from edge_reft.train import TrainConfig, train
    q = shapes.gguf("granite", "Q4_K_M")
    with Engine(q, n_ctx=128) as e:
        toks = e.prompt_tokens(PROMPT, raw=True)
        np.testing.assert_array_equal(e.logits(toks, identity(e.base, 1, "all")), e.logits(toks))
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "Hi", "response": "Hello"}\n')
    with pytest.raises(ReftError, match="'granite' is not supported for training") as err:
        train(q, data, tmp_path / "p.reft", TrainConfig(layers=(1,)), progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "p.reft").exists()
