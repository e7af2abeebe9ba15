"""Hugging Face transformers side: a GGUF as an HF model, and LoReFT through hooks.

This is the PyTorch reference every runtime is tested against (and what
training and ``edge-reft eval`` use before a runtime exists): a forward hook
on decoder block L edits its output (pyreft's ``block_output``) at the
positions of the shared position rules, with the shared torch math.

Imports torch and transformers: never imported by the runtime.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .loreft_torch import edit
from edge_reft.files import atomic_dir, lock_file, locked, sha256_file
from edge_reft.models import cache_dir
from edge_reft.outputs import check_output
from edge_reft.patch import Patch


HF_RECIPE = 2  # part of hf_dir's cache key: bump when what it writes for a GGUF changes

# llama.cpp's Gemma 2 / 3 scale queries by 1/sqrt(head size), and by 1/sqrt(n_embd / n_head) in
# the 27B models, which it knows by their block count (src/models/gemma2.cpp, gemma3.cpp)
GEMMA_27B_BLOCKS = {"gemma2": 46, "gemma3": 62}


def gguf_config(path: str | os.PathLike[str]) -> Any:
    """transformers' config of a GGUF, completed from the file where transformers' GGUF reader
    leaves a config class's default: the head size (Qwen3: 128 instead of the file's
    attention.key_length) and Gemma's query scale (256, which the file does not record)."""
    from transformers import AutoConfig

    from edge_reft.fingerprint import gguf_metadata
    p = Path(path)
    cfg = AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name)
    fields = gguf_metadata(p).fields
    arch = fields["general.architecture"].value
    head = fields.get(f"{arch}.attention.key_length")
    text = cfg.get_text_config()
    if head is not None and getattr(text, "head_dim", None) not in (None, int(head.value)):
        text.head_dim = int(head.value)
    if arch in GEMMA_27B_BLOCKS:
        big = text.num_hidden_layers == GEMMA_27B_BLOCKS[arch]
        text.query_pre_attn_scalar = text.hidden_size // text.num_attention_heads if big else text.head_dim
    return cfg


def load_gguf(path: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(model, tokenizer) from a GGUF, dequantized by transformers (slow: use ``hf_dir``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    p = Path(path)
    model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, config=gguf_config(p), dtype=dtype)
    tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    return model, tok


def hf_dir(gguf: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """An HF model folder (float32 safetensors, tokenizer, chat template) with exactly the
    dequantized weights of ``gguf``; cached by the file's sha256 unless ``out`` is given."""
    target = Path(out) if out else cache_dir() / "hf" / f"{sha256_file(gguf)[:20]}-{HF_RECIPE}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # one builder at a time: a second run waits, then finds the folder made
    with locked(lock_file(target)):
        if (target / "config.json").exists():
            return target
        check_output(target, [gguf], flag="out", folder=True)  # never replace a folder of other files
        if not out:
            print(f"[edge-reft] writing a float32 copy of {Path(gguf).name} to {target} (once per model; "
                  "`edge-reft cache list` shows it, `edge-reft cache clear hf` removes it)",
                  file=sys.stderr, flush=True)
        model, tok = load_gguf(gguf)
        # transformers refuses to save a GGUF-loaded model until its quantizer is detached
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        with atomic_dir(target, replace=True) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    return target


def decoder_layers(model: Any) -> Any:
    """The ModuleList of decoder blocks of a causal LM (llama, gemma3, qwen, mistral ...)."""
    for path in ("model.layers", "model.language_model.layers", "transformer.h"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            return obj
        except AttributeError:
            continue
    raise TypeError(f"cannot find the decoder blocks of {type(model).__name__}")


class ReftHooks:
    """Apply patches to an HF model's block outputs while the context is active.

    Set ``start`` (absolute position of the first token of the next forward)
    and ``n_prompt`` before each forward; prompt-scoped rules edit prompt
    positions only, ``all`` edits every position.
    """

    def __init__(self, model: Any, patches: Sequence[Patch]):
        self.model, self.start, self.n_prompt = model, 0, 0
        ivs = [iv for p in patches for iv in p.interventions]
        self.by_layer: dict[int, list[tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        for iv in ivs:  # (A, B, c) from the type's own rule, as the runtimes get them
            a, b, c = (torch.from_numpy(x.copy()) for x in iv.compiled())
            self.by_layer.setdefault(iv.layer, []).append((iv.positions, a, b, c))
        self._handles: list[Any] = []

    def __enter__(self) -> "ReftHooks":
        layers = decoder_layers(self.model)
        for L, items in self.by_layer.items():
            self._handles.append(layers[L].register_forward_hook(self._hook(items)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, items: list):
        def hook(module: Any, args: Any, output: Any) -> Any:
            h = output[0] if isinstance(output, tuple) else output
            n = h.shape[1]
            pos = torch.arange(self.start, self.start + n)
            h = h.clone()
            for rule, r, delta, b in items:
                if rule.all:
                    idx = torch.arange(n)
                else:
                    sel = torch.from_numpy(rule.select(self.n_prompt))
                    idx = torch.nonzero(torch.isin(pos, sel)).flatten()
                if idx.numel():
                    h[:, idx] = edit(h[:, idx], r, delta, b).to(h.dtype)
            return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h
        return hook


@torch.no_grad()
def reference_logits(model: Any, tokens: Sequence[int], patches: Sequence[Patch] = (),
                     n_prompt: int | None = None) -> np.ndarray:
    """Logits (n, vocab) of one forward over ``tokens`` with the patches applied."""
    with ReftHooks(model, patches) as hooks:
        hooks.start, hooks.n_prompt = 0, len(tokens) if n_prompt is None else n_prompt
        out = model(torch.tensor([list(tokens)]), use_cache=False)
    return out.logits[0].float().numpy()


@torch.no_grad()
def reference_greedy(model: Any, tokens: Sequence[int], patches: Sequence[Patch], max_tokens: int,
                     stop_ids: Sequence[int] = ()) -> list[int]:
    """Greedy continuation with the KV cache, prompt-scoped edits during prefill only."""
    from transformers import DynamicCache
    out: list[int] = []
    cache = DynamicCache()
    with ReftHooks(model, patches) as hooks:
        hooks.start, hooks.n_prompt = 0, len(tokens)
        step = list(tokens)
        for _ in range(max_tokens):
            logits = model(torch.tensor([step]), past_key_values=cache, use_cache=True).logits[0, -1]
            tok = int(torch.argmax(logits))
            if tok in stop_ids:
                break
            out.append(tok)
            hooks.start += len(step)
            step = [tok]
    return out
