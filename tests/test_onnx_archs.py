"""export-onnx per architecture, each as a tiny random-weight GGUF made by llama.cpp's own
converter (tests/shapes.py): the fp32 export with a patch computes what transformers
computes on the original model with the same patch as hooks, an identity patch equals no
patch, and the int4 export carries the patch's effect; an architecture the export cannot
serve is refused by name, before any work.

The exports are cached in EDGE_REFT_CACHE/onnx/ (about 10 s each on 2 cores).  llama, gemma3
(the builder shim) and gemma2 (four norms a block, soft-capping, sliding window) run by
default, the rest with -m slow.
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

PROMPT = " ".join(["Tell me about the moon and its phases."] * 6)  # 107 tokens: past the Gemmas' 64-token window
DEFAULT = ("llama", "gemma2", "gemma3")
EXPORTED = [pytest.param(a, marks=() if a in DEFAULT else pytest.mark.slow)
            for a in ("llama", "llama-untied", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")]
REFUSED = {  # tiny shape -> what the refusal names
    "granite": "architecture 'granite' cannot be exported to ONNX: transformers cannot read granite GGUFs",
}


def _export(arch: str, precision: str):
    from edge_reft.converters.onnx_export import export_onnx
    from edge_reft.models import cache_dir
    f32 = shapes.gguf(arch, "F32")
    return export_onnx(f32, cache_dir() / "onnx" / f"shape-{f32.stem}-{precision}", precision=precision,
                       slots=2, max_rank=8)


def _reference(arch: str, toks: list[int], patch):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(shapes.hf_folder(arch), dtype=torch.float32,
                                              attn_implementation="eager").eval()
    return reference_logits(hf, toks, [patch]), reference_logits(hf, toks, [])


def _patch(base):
    """Every block, two edits stacked on block 1 (both slots), all three position rules."""
    n = base.n_layer
    return random_patch(base, [(0, "f2+l2", 4), (1, "l1", 8), (1, "all", 2), (n - 1, "all", 2)], scale=4.0, seed=7)


@pytest.mark.parametrize("arch", EXPORTED)
def test_fp32_export_equals_the_torch_reference(arch):
    with Engine(_export(arch, "fp32"), backend="onnx", n_ctx=256, n_threads=2) as e:
        toks = e.prompt_tokens(PROMPT)
        patch = _patch(e.base)
        ref, plain = _reference(arch, toks, patch)
        assert np.abs(ref - plain).max() > 0.5, "the patch must change the logits for the test to mean anything"
        got, bare = e.logits(toks, patch), e.logits(toks)
        err, gap = np.abs(got - ref).max(), np.abs(bare - plain).max()
        print(f"\n{arch} fp32 ONNX vs torch: max |logits diff| {err:.2e} patched, {gap:.2e} without a patch")
        assert err < 1e-4 and gap < 1e-4, (arch, err, gap)
        np.testing.assert_array_equal(e.logits(toks, identity(e.base, 1, "all")), bare)


@pytest.mark.slow
@pytest.mark.parametrize("arch", [p.values[0] for p in EXPORTED])
def test_int4_export_carries_the_patch(arch):
    """The builder's int4 blocks alone move these random models' logits by 23-32 % (relative
    norm); the patch's effect (patched minus unpatched) stays within 0.5 of the reference's:
    measured 0.16-0.19, and 0.31-0.41 for the Gemmas, where the effect is half the logits'
    norm and the int4 error the largest.  A patch lost or misplaced would be ~1."""
    with Engine(_export(arch, "int4"), backend="onnx", n_ctx=256, n_threads=2) as e:
        toks = e.prompt_tokens(PROMPT)
        patch = _patch(e.base)
        ref, plain = _reference(arch, toks, patch)
        bare = e.logits(toks)
        effect, want = e.logits(toks, patch) - bare, ref - plain
        rel = np.linalg.norm(effect - want) / np.linalg.norm(want)
        print(f"\n{arch} int4 ONNX: the patch's effect is the reference's to {rel:.3f} (relative)")
        assert rel < 0.5, (arch, rel)
        np.testing.assert_array_equal(e.logits(toks, identity(e.base, 1, "all")), bare)


@pytest.mark.parametrize("arch", sorted(REFUSED))
def test_an_architecture_the_export_cannot_serve_is_refused_by_name(arch, tmp_path):
    from edge_reft.converters.onnx_export import export_onnx
    with pytest.raises(ReftError, match="supported: gemma2, gemma3, llama, phi3, qwen2, qwen3") as err:
        export_onnx(shapes.gguf(arch, "F32"), tmp_path / "out", precision="fp32")
    assert REFUSED[arch] in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_a_long_context_phi3_is_refused_before_any_work(tmp_path):
    """transformers' GGUF reader drops Phi-3's LongRoPE factors (the rope_factors_long/short
    tensors, which llama.cpp's converter writes with rope.scaling.attn_factor), so its HF model
    would not be the model llama.cpp runs: refused from the metadata alone (this file has no
    weights at all)."""
    from hostile import ARR, F32, STR, U32, G

    from edge_reft.converters.onnx_export import export_onnx
    g = G().set("general.architecture", STR, "phi3").set("phi3.embedding_length", U32, 256)
    g.set("phi3.block_count", U32, 3).set("tokenizer.ggml.tokens", ARR, ["<unk>", "a", "b"], STR)
    g.set("phi3.rope.scaling.attn_factor", F32, 1.19)
    for name in ("rope_factors_long.weight", "rope_factors_short.weight"):
        g.tensors.append((name, (32,), 0, np.ones(32, "<f4").tobytes()))
    src = tmp_path / "phi3-128k.gguf"
    src.write_bytes(g.bytes())
    with pytest.raises(ReftError, match="'phi3' cannot be exported to ONNX: transformers drops a long-context"):
        export_onnx(src, tmp_path / "out", precision="fp32")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_gemma3_270m_exports_with_its_two_rope_bases(gemma3_q4):
    """The real Gemma 3 270M (Q4_K_M, 18 blocks: sliding-window layers with RoPE base 10k and
    global ones with 1M, which the builder reads through converters/builder_shim.py): the fp32
    export with a patch equals transformers on the dequantized file with the same patch, to the
    gap the two have without one.  73 tokens: within the 512-token sliding window."""
    from transformers import AutoModelForCausalLM

    from edge_reft.converters.onnx_export import export_onnx
    from edge_reft.models import cache_dir
    from edge_reft.train.hf import hf_dir
    folder = export_onnx(gemma3_q4, cache_dir() / "onnx" / "gemma3-270m-fp32", precision="fp32",
                         layers=[2, 9, 17], slots=1, max_rank=8)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir(gemma3_q4), dtype=torch.float32,
                                              attn_implementation="eager").eval()
    with Engine(folder, backend="onnx", n_ctx=512, n_threads=2) as e:
        toks = e.prompt_tokens(" ".join(["Tell me about the moon and its phases."] * 8), raw=True)
        patch = random_patch(e.base, [(2, "f2+l2", 4), (9, "all", 8), (17, "l1", 2)], scale=4.0, seed=3)
        ref, plain = reference_logits(hf, toks, [patch]), reference_logits(hf, toks, [])
        got, bare = e.logits(toks, patch), e.logits(toks)
    err, gap, moved = np.abs(got - ref).max(), np.abs(bare - plain).max(), np.abs(ref - plain).max()
    print(f"\ngemma3 270M fp32 ONNX vs torch ({len(toks)} tokens): {err:.2e} patched, {gap:.2e} without; "
          f"the patch moves the logits by {moved:.1f}")
    # ORT's and torch's float32 kernels differ by ~1.3e-3 on this model's 262k logits without any
    # patch; the patch adds nothing beyond that (measured 1.37e-3 patched, 1.26e-3 without)
    assert moved > 0.5 and gap < 2e-3 and err < gap + 5e-4, (err, gap, moved)


def test_a_gemma3_with_scaled_rope_is_refused(tmp_path):
    """Gemma 3 4B and up scale the global layers' RoPE (linear, factor 8); the builder would
    scale the sliding-window layers too.  transformers 5 writes the config per layer type."""
    import json

    from edge_reft.converters.onnx_export import _builder_input
    hf = tmp_path / "hf"
    hf.mkdir()
    rope = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    (hf / "config.json").write_text(json.dumps({"model_type": "gemma3_text", "rope_parameters": rope}))
    with pytest.raises(ReftError, match="gemma3_text with RoPE scaling cannot be exported"):
        _builder_input(hf, tmp_path / "tmp")
    rope["full_attention"] = {"rope_type": "default", "rope_theta": 1e6}  # the 270M and 1B: no view needed
    (hf / "config.json").write_text(json.dumps({"model_type": "gemma3_text", "rope_parameters": rope}))
    assert _builder_input(hf, tmp_path / "tmp") == hf
