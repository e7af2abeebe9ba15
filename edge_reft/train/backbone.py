"""The frozen 4-bit backbone a patch trains on, as a transformers model.

Two kinds:
- ``gguf`` (for a .gguf BASE, the default): transformers provides the
  architecture (attention, RoPE, norms), and every linear layer and the token
  embedding are replaced by the GGUF's own quantized blocks (``ggufq``),
  checked bit for bit against transformers' dequantization of the same file.
  The patch trains on exactly the weights llama.cpp serves.
- ``nf4`` (for an HF folder, or a GGUF on request): bitsandbytes NF4, compute
  in float32 on the CPU.  Re-quantizing a GGUF to NF4 stacks a second
  rounding on the first; ``weight_gap`` measures how far that moves the weights.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ReftError
from ..fingerprint import base_model
from ..patch import BaseModel
from .ggufq import DequantCache, GGUFEmbedding, GGUFLinear

# HF module suffix -> GGUF tensor name (per block), for llama-like and gemma3 models
LINEARS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down"}


@dataclass
class Backbone:
    model: Any                 # a transformers causal LM, eval mode, no trainable weights
    base: BaseModel            # identity of the base (the patch's fingerprint)
    kind: str                  # "gguf" or "nf4"
    source: Path               # the GGUF file or HF folder
    cache: DequantCache | None = None


def _gguf_tensors(path: Path) -> dict[str, tuple[torch.Tensor, int, tuple[int, ...]]]:
    """name -> (raw uint8 rows, ggml type, numpy shape), memory-mapped from the file."""
    import gguf

    from .. import ggufscan
    from ..fingerprint import MODEL_LIMITS
    sizes = {int(k): v for k, v in gguf.GGML_QUANT_SIZES.items()}
    limits = dataclasses.replace(MODEL_LIMITS, tensor_types=sizes)
    g = ggufscan.read_metadata(path, limits)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    with warnings.catch_warnings():  # a read-only map: these buffers are never written
        warnings.simplefilter("ignore", UserWarning)
        for t in g.tensors:
            rows = t.shape[0] if len(t.shape) == 2 else 1
            raw = torch.from_numpy(mm[t.offset:t.offset + t.nbytes]).reshape(rows, -1)
            out[t.name] = (raw, t.ggml_type, t.shape)
    return out


def _unpermute_rows(raw: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation for RoPE (convert_hf_to_gguf's ``permute``)."""
    rows = raw.shape[0]
    return raw.reshape(n_head, rows // n_head // 2, 2, -1).transpose(1, 2).reshape(rows, -1)


def _swap_linear(model: Any, name: str, raw: torch.Tensor, qtype: int, cache: DequantCache,
                 n_head: int | None) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, attr)
    want = old.weight.detach()
    for candidate in ([raw, _unpermute_rows(raw, n_head)] if n_head else [raw]):
        new = GGUFLinear(candidate.contiguous(), qtype, want.shape[0], want.shape[1], cache)
        if torch.equal(new.dequantize(), want):
            setattr(parent, attr, new)
            return
    raise ReftError(f"{name}: the GGUF blocks do not dequantize to transformers' weights; "
                    "refusing to train on a mismatched backbone")


def load_gguf_backbone(path: Path, cache_mb: int = 1024) -> Backbone:
    """transformers' architecture with the GGUF's quantized blocks as its weights."""
    from transformers import AutoModelForCausalLM

    from ..hf import hf_dir
    model = AutoModelForCausalLM.from_pretrained(hf_dir(path), dtype=torch.float32)
    cfg = model.config.get_text_config()
    tensors = _gguf_tensors(path)
    cache = DequantCache(cache_mb << 20)
    arch = base_model(path).architecture
    for i in range(cfg.num_hidden_layers):
        for suffix, gname in LINEARS.items():
            raw, qtype, _ = tensors[f"blk.{i}.{gname}.weight"]
            heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}.get(gname)
            _swap_linear(model, f"model.layers.{i}.{suffix}", raw, qtype, cache,
                         heads if arch == "llama" else None)
    raw, qtype, (n_vocab, dim) = tensors["token_embd.weight"]
    emb = model.get_input_embeddings()
    scale = float(emb.embed_scale) if hasattr(emb, "embed_scale") else 1.0
    new_emb = GGUFEmbedding(raw, qtype, n_vocab, dim, scale)
    probe = torch.arange(0, n_vocab, max(1, n_vocab // 64))
    if not torch.equal(new_emb(probe), emb(probe)):
        raise ReftError("token_embd: the GGUF rows do not match transformers' embedding")
    model.set_input_embeddings(new_emb)
    head_raw, head_type, _ = tensors.get("output.weight", tensors["token_embd.weight"])
    _swap_linear(model, "lm_head", head_raw, head_type, cache, None)
    model.requires_grad_(False)
    return Backbone(model.eval(), base_model(path), "gguf", path, cache)


def load_nf4_backbone(path: Path) -> Backbone:
    """bitsandbytes NF4 (compute float32, CPU) from an HF folder, or from a GGUF via its HF folder."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from ..hf import hf_dir
    folder = hf_dir(path) if path.is_file() else path
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                           bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=q, device_map="cpu",
                                                 dtype=torch.float32)
    model.requires_grad_(False)
    import bitsandbytes as bnb
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            # bitsandbytes 0.50 repacks a CPU layer for bf16 inference the first time it runs in
            # eval mode without grad, and the repacked kernel has no backward: gradients through
            # it are silently wrong.  Training needs the plain NF4 path, always.
            m.support_avx512bf16_for_cpu = False
    return Backbone(model.eval(), base_model(path), "nf4", path)


def load_backbone(base: str | os.PathLike[str], kind: str | None = None, cache_mb: int = 1024) -> Backbone:
    """A GGUF file (default kind "gguf") or an HF model folder (kind "nf4")."""
    path = Path(base)
    if not path.exists():
        raise ReftError(f"{path}: no such model (expected a .gguf file or an HF model folder)")
    kind = kind or ("nf4" if path.is_dir() else "gguf")
    if kind == "gguf":
        if path.is_dir():
            raise ReftError(f"{path}: backbone 'gguf' needs a .gguf file; an HF folder trains in 'nf4'")
        return load_gguf_backbone(path, cache_mb)
    if kind == "nf4":
        return load_nf4_backbone(path)
    raise ReftError(f"backbone: {kind!r}, expected 'gguf' or 'nf4'")


def weight_gap(a: Backbone, b: Backbone) -> dict[str, float]:
    """Relative Frobenius distance between two backbones' linear weights (all blocks)."""
    num = den = 0.0
    worst = 0.0
    layers_a = dict(_linears(a.model))
    for name, wb in _linears(b.model):
        wa = layers_a[name]
        d = float(torch.linalg.norm(wa - wb)) ** 2
        n = float(torch.linalg.norm(wa)) ** 2
        num, den, worst = num + d, den + n, max(worst, (d / n) ** 0.5)
    return {"relative_frobenius": (num / den) ** 0.5, "worst_layer": worst}


def _linears(model: Any):
    for name, m in model.named_modules():
        if name.startswith("model.layers.") and name.rsplit(".", 1)[-1].endswith("_proj"):
            yield name, _dense_weight(m)


def _dense_weight(m: Any) -> torch.Tensor:
    if isinstance(m, GGUFLinear):
        return m.dequantize()
    w = m.weight
    if hasattr(w, "quant_state"):  # bitsandbytes Params4bit
        import bitsandbytes.functional as bnbf
        return bnbf.dequantize_4bit(w.data, w.quant_state).float()
    return w.detach().float()
