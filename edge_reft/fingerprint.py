"""Identify a base model: shape plus a fingerprint equal for all its quantizations.

fingerprint = sha256 over a version tag, the architecture (GGUF's name),
n_embd, n_layer and the tokenizer vocabulary (every token string, in id
order, length-prefixed, with SentencePiece's U+2581 read as a space: GGUF
keeps user-defined pieces such as "  " literal where an HF tokenizer.json
spells them "▁▁").  Weights do not enter it, so Q4_1, Q8_0, F32 and the HF
folder of one model agree, and a patch can be checked against any of them.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

from . import ggufscan as gs
from .errors import ReftFormatError
from .patch import BaseModel

MODEL_LIMITS = gs.Limits(max_array_depth=2, tensor_types=None, strict_utf8=False,
                         max_string_bytes=64 << 20)
# the same, with every tensor's type, shape and data range checked against the file (inspect)
MODEL_CHECK_LIMITS = gs.Limits(max_array_depth=2, tensor_types=gs.GGML_BLOCKS, strict_utf8=False,
                               max_string_bytes=64 << 20)
_TAG = b"edge-reft fingerprint v1\n"
# HF config.model_type -> GGUF general.architecture, where they differ
HF_TO_GGUF_ARCH = {"mistral": "llama", "gemma3_text": "gemma3", "qwen2_moe": "qwen2moe",
                   "gpt_neox": "gptneox", "stablelm": "stablelm"}


def fingerprint(architecture: str, n_embd: int, n_layer: int, tokens: Iterable[str]) -> str:
    h = hashlib.sha256(_TAG)
    toks = list(tokens)
    h.update(f"{architecture}\n{n_embd}\n{n_layer}\n{len(toks)}\n".encode())
    for t in toks:
        b = t.replace("\u2581", " ").encode("utf-8", "surrogateescape")
        h.update(len(b).to_bytes(4, "little"))
        h.update(b)
    return h.hexdigest()


@functools.lru_cache(maxsize=16)
def _gguf_metadata(path: str, _mtime_ns: int, _size: int) -> gs.GGUFFile:
    return gs.read_metadata(path, MODEL_LIMITS)


def gguf_metadata(path: str | os.PathLike[str]) -> gs.GGUFFile:
    """The parsed metadata of a model GGUF (cached while the file is unchanged)."""
    p = os.path.abspath(os.fspath(path))
    try:
        st = os.stat(p)
    except OSError as e:
        raise ReftFormatError(p, f"file: cannot be read ({e.strerror or e})") from None
    return _gguf_metadata(p, st.st_mtime_ns, st.st_size)


def from_gguf(path: str | os.PathLike[str]) -> BaseModel:
    """The BaseModel of a model GGUF file (any quantization)."""
    g = gguf_metadata(path)
    problems = []

    def get(k: str, want: str):
        v = g.fields.get(k)
        if v is None or v.type_name not in (want if isinstance(want, tuple) else (want,)):
            problems.append(f"{k}: missing or not {want} (is this a model GGUF?)")
            return None
        return v.value

    if g.fields.get("general.type") and g.fields["general.type"].value == "adapter":
        raise ReftFormatError(g.path, "general.type: 'adapter' — this is an adapter/patch, "
                                      "expected a model GGUF")
    arch = get("general.architecture", "STRING")
    n_embd = get(f"{arch}.embedding_length", ("UINT32", "UINT64", "INT32")) if arch else None
    n_layer = get(f"{arch}.block_count", ("UINT32", "UINT64", "INT32")) if arch else None
    tokens = get("tokenizer.ggml.tokens", "ARRAY[STRING]")
    if problems:
        raise ReftFormatError(g.path, problems)
    name = g.fields.get("general.name")
    return BaseModel(arch, int(n_embd), int(n_layer), fingerprint(arch, n_embd, n_layer, tokens),
                     name.value if name is not None and name.type == gs.STRING else "")


def hf_vocab(tokenizer_json: dict, vocab_size: int) -> list[str]:
    """Token strings in id order from a tokenizer.json, padded as llama.cpp's converter pads."""
    model = tokenizer_json.get("model", {})
    vocab = model.get("vocab", {})
    by_id: dict[int, str] = {}
    if isinstance(vocab, dict):
        by_id.update((int(i), t) for t, i in vocab.items())
    else:  # Unigram: a list of [piece, score]
        by_id.update((i, entry[0]) for i, entry in enumerate(vocab))
    for tok in tokenizer_json.get("added_tokens", []):
        by_id[int(tok["id"])] = tok["content"]
    n = max(vocab_size, max(by_id, default=-1) + 1)
    return [by_id.get(i, f"[PAD{i}]") for i in range(n)]


def from_hf_dir(path: str | os.PathLike[str]) -> BaseModel:
    """The BaseModel of a Hugging Face model folder (config.json + tokenizer.json)."""
    d = Path(path)
    try:
        config = json.loads((d / "config.json").read_text())
        tok = json.loads((d / "tokenizer.json").read_text())
    except (OSError, ValueError) as e:
        raise ReftFormatError(d, f"HF model folder: needs a readable config.json and tokenizer.json ({e})") from None
    text = config.get("text_config") or config
    model_type = text.get("model_type") or config.get("model_type", "")
    arch = HF_TO_GGUF_ARCH.get(model_type, model_type)
    try:
        n_embd, n_layer = int(text["hidden_size"]), int(text["num_hidden_layers"])
    except (KeyError, TypeError, ValueError):
        raise ReftFormatError(d / "config.json", "hidden_size / num_hidden_layers: missing") from None
    tokens = hf_vocab(tok, int(text.get("vocab_size") or config.get("vocab_size") or 0))
    name = config.get("_model_name_or_path") or config.get("_name_or_path") or d.name
    return BaseModel(arch, n_embd, n_layer, fingerprint(arch, n_embd, n_layer, tokens), Path(name).name)


def base_model(path: str | os.PathLike[str]) -> BaseModel:
    """BaseModel of a GGUF file or an HF model folder."""
    p = Path(path)
    if p.is_dir():
        return from_hf_dir(p)
    return from_gguf(p)
