"""The frozen 4-bit backbone a patch trains on, as a transformers model.

Two kinds:
- ``gguf`` (for a .gguf BASE, the default): transformers provides the
  architecture (attention, RoPE, norms), built without weights; every linear
  layer and the token embedding are the GGUF's own quantized blocks (``ggufq``),
  the small float tensors come from the file.  The patch trains on exactly the
  weights llama.cpp serves, and no full-precision copy is ever made.
- ``nf4`` (for an HF folder, or a GGUF on request): bitsandbytes NF4, compute
  in float32 on the CPU.  Re-quantizing a GGUF to NF4 stacks a second
  rounding on the first; ``weight_gap`` measures how far that moves the weights.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_reft.errors import ReftError
from edge_reft.fingerprint import base_model
from edge_reft.patch import BaseModel
from .ggufq import DequantCache, GGUFEmbedding, GGUFLinear

# GGUF architectures whose mapping onto transformers' models is tested bit for bit, per
# architecture (tests/test_archs.py); Mistral's GGUFs are "llama".  Any other is refused.
TRAINABLE = ("gemma2", "gemma3", "llama", "phi3", "qwen2", "qwen3")


def check_trainable(path: Path, arch: str) -> None:
    if arch not in TRAINABLE:
        raise ReftError(f"{path}: architecture {arch!r} is not supported for training (supported: "
                        f"{', '.join(TRAINABLE)}); patches for it still run in llama.cpp")


@dataclass
class Backbone:
    model: Any                 # a transformers causal LM, eval mode, no trainable weights
    base: BaseModel            # identity of the base (the patch's fingerprint)
    kind: str                  # "gguf" or "nf4"
    source: Path               # the GGUF file or HF folder
    cache: DequantCache | None = None
    device: str = "cpu"


DEVICES = ("auto", "cpu", "cuda", "mps")


def pick_device(name: str = "auto") -> str:
    """``auto``: CUDA, then Apple's MPS, then the CPU; a named device must be there."""
    if name not in DEVICES:
        raise ReftError(f"--device {name!r}: expected one of {', '.join(DEVICES)}")
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if (name == "cuda" and not cuda) or (name == "mps" and not mps):
        raise ReftError(f"--device {name}: this torch ({torch.__version__}) sees no {name.upper()} device "
                        "(use --device cpu, or a torch build for it)")
    return name


def _gguf_tensors(path: Path) -> dict[str, tuple[torch.Tensor, int, tuple[int, ...]]]:
    """name -> (raw uint8 rows, ggml type, numpy shape), memory-mapped from the file."""
    import gguf

    from edge_reft import ggufscan
    from edge_reft.fingerprint import MODEL_LIMITS
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


def _skeleton(path: Path) -> Any:
    """transformers' architecture for this GGUF with its parameters on the meta device: the
    config is read from the file's metadata, no weight is materialized."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from .hf import gguf_config
    try:
        cfg = gguf_config(path)
    except (ValueError, KeyError) as e:
        raise ReftError(f"{path}: transformers cannot build this GGUF's architecture ({e}); "
                        "training on it is not supported") from e
    with init_empty_weights():  # parameters on meta; buffers (RoPE tables) real
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def _processor(model: Any, arch: str) -> Any:
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor
    return TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=model.config.to_dict())


def load_gguf_backbone(path: Path, cache_mb: int = 1024, device: str = "cpu") -> Backbone:
    """transformers' architecture with the GGUF's quantized blocks as its weights.

    Never a full-precision copy: the model is built on the meta device, every linear layer
    and the embedding become the file's own blocks (memory-mapped), and only the small
    float tensors (norms, biases) are materialized, through transformers' own per-architecture
    GGUF processing.  Bit-for-bit equality with transformers' dequantized model is tested
    per architecture (tests/test_train.py), not recomputed at every load.
    """
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    from .ggufq import dequantize
    arch = base_model(path).architecture
    check_trainable(path, arch)
    model = _skeleton(path)
    cfg = model.config.get_text_config()
    processor = _processor(model, arch)
    names = get_gguf_hf_weights_map(model, processor)
    tensors = _gguf_tensors(path)
    cache = DequantCache(cache_mb << 20)
    heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}
    floats = []
    for gname, (raw, qtype, shape) in tensors.items():
        hf = names.get(gname)
        if hf is None:
            continue
        module_name, _, attr = hf.rpartition(".")
        module = model.get_submodule(module_name)
        if isinstance(module, torch.nn.Linear) and attr == "weight":
            kind = gname.split(".")[-2]
            rows = _unpermute_rows(raw, heads[kind]) if arch == "llama" and kind in heads else raw
            owner, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(owner) if owner else model, child,
                    GGUFLinear(rows.contiguous(), qtype, module.out_features, module.in_features, cache))
        elif isinstance(module, torch.nn.Embedding) and attr == "weight":
            scale = float(module.embed_scale) if hasattr(module, "embed_scale") else 1.0
            model.set_input_embeddings(GGUFEmbedding(raw, qtype, shape[0], shape[1], scale))
        else:
            floats.append((gname, raw, qtype, shape, module_name, attr))
    for gname, raw, qtype, shape, module_name, attr in floats:  # norms, biases: small, float32
        n = int(np.prod(shape))
        dense = dequantize(raw.reshape(-1), qtype, (1, n)).reshape(n).numpy()
        value = torch.from_numpy(np.ascontiguousarray(processor.process(dense, gname).weights, np.float32))
        module = model.get_submodule(module_name)
        like = module.bias if isinstance(module, GGUFLinear) else module._parameters[attr]
        module._parameters[attr] = torch.nn.Parameter(value.reshape(
            (module.out_features,) if like is None else like.shape), requires_grad=False)
    if not isinstance(model.get_output_embeddings(), GGUFLinear):  # a head tied to the embedding
        head_raw, head_type, (n_vocab, dim) = tensors.get("output.weight", tensors["token_embd.weight"])
        model.set_output_embeddings(GGUFLinear(head_raw, head_type, n_vocab, dim, cache))
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ReftError(f"{path}: edge-reft cannot map this {arch} GGUF onto transformers' model: "
                        f"{len(missing)} weights have no tensor in the file (first: {missing[0]})")
    model.requires_grad_(False)
    # the quantized blocks (4-5 bits a weight) move; dequantized matrices are made there
    return Backbone(model.to(device).eval(), base_model(path), "gguf", path, cache, device)


def load_nf4_backbone(path: Path, device: str = "cpu") -> Backbone:
    """bitsandbytes NF4 (compute float32, on the CPU or CUDA) from an HF folder, or from a GGUF
    via its HF folder."""
    if device not in ("cpu", "cuda"):
        raise ReftError(f"--backbone nf4 --device {device}: bitsandbytes runs on cpu or cuda; use "
                        "--backbone gguf (the default for a .gguf) on this device")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from .hf import hf_dir
    folder = hf_dir(path) if path.is_file() else path
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                           bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=q, device_map=device,
                                                 dtype=torch.float32)
    model.requires_grad_(False)
    import bitsandbytes as bnb
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            # bitsandbytes 0.50 repacks a CPU layer for bf16 inference the first time it runs in
            # eval mode without grad, and the repacked kernel has no backward: gradients through
            # it are silently wrong.  Training needs the plain NF4 path, always.
            m.support_avx512bf16_for_cpu = False
    return Backbone(model.eval(), base_model(path), "nf4", path, None, device)


def _quiet_libraries() -> None:
    """transformers' and huggingface_hub's own progress bars and notices would interleave
    with edge-reft's; training reports its own progress."""
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()
    except ImportError:
        pass


def _return_freed_memory() -> None:
    """glibc raises its mmap threshold to the largest block freed (up to 32 MB), after which
    the dequantized slices and activations freed at every step stay in its heaps: on a 1 B
    model that held 1.3 GB more than the steps use.  A fixed 1 MiB threshold hands every
    large buffer back to the system when it is freed."""
    if sys.platform.startswith("linux"):
        import ctypes
        try:
            ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (glibc; not musl)
        except (OSError, AttributeError):
            pass


def load_backbone(base: str | os.PathLike[str], kind: str | None = None, cache_mb: int = 1024,
                  device: str = "cpu") -> Backbone:
    """A GGUF file (default kind "gguf") or an HF model folder (kind "nf4"), on ``device``
    (``auto`` picks CUDA, MPS, then the CPU)."""
    device = pick_device(device)
    path = Path(base)
    if not path.exists():
        raise ReftError(f"{path}: no such model (expected a .gguf file or an HF model folder)")
    kind = kind or ("nf4" if path.is_dir() else "gguf")
    _quiet_libraries()
    _return_freed_memory()
    if kind == "gguf":
        if path.is_dir():
            raise ReftError(f"{path}: backbone 'gguf' needs a .gguf file; an HF folder trains in 'nf4'")
        return load_gguf_backbone(path, cache_mb, device)
    if kind == "nf4":
        return load_nf4_backbone(path, device)
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
