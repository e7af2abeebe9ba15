"""A Hugging Face ``tokenizer.json`` folder as llama.cpp sees its vocabulary: ids, each
token's bytes, and the tokens that end generation.

One wrapper for every HF folder edge-reft reads (an ONNX export, an HF base
being trained or evaluated), so they share one end-of-turn rule: the configs'
``eos_token_id``, plus the special tokens llama.cpp ends generation on by text.
Needs the ``tokenizers`` library (imported when a folder is opened), never torch.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .chat import ChatTemplate, Prompter
from .errors import ReftError

# end-of-generation tokens as llama.cpp recognizes them by text (end of turn, FIM pad/repo/sep)
EOG_TEXTS = frozenset({"<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>",
                       "<|endoftext|>", "<EOT>", "_<EOT>", "<｜end▁of▁sentence｜>", "<end_of_utterance>",
                       "<|return|>", "<|call|>", "<|fim_pad|>", "<fim-pad>", "<PAD>", "<|fim_repo|>",
                       "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>", "<|file_sep|>"})


class HFTokenizer:
    """Tokenization with the ``tokenizers`` library, token bytes and end-of-generation ids."""

    def __init__(self, folder: str | os.PathLike[str]):
        from tokenizers import Tokenizer
        self.folder = Path(folder)
        path = self.folder / "tokenizer.json"
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
            self.plain = Tokenizer.from_file(str(path))  # a second one: the flag is per instance
            self.plain.encode_special_tokens = True
            spec = json.loads(path.read_text())
        except Exception as e:  # tokenizers raises its own exception type
            raise ReftError(f"{path}: cannot be read as a tokenizer ({e})") from None
        self.pieces = token_bytes(spec)
        self.eog = frozenset(eog_ids(self.folder, spec))

    def encode(self, text: str, add_special: bool) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special).ids

    def encode_text(self, text: str) -> list[int]:
        """``text`` as plain characters: special-token text in it is not a control token
        (message content; llama.cpp's ``parse_special=False``)."""
        return self.plain.encode(text, add_special_tokens=False).ids

    def piece(self, token: int) -> bytes:
        return self.pieces[token] if 0 <= token < len(self.pieces) else b""

    def decode(self, tokens: list[int]) -> str:
        return b"".join(map(self.piece, tokens)).decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        return token in self.eog

    def prompter(self) -> Prompter:
        """The folder's chat template (none if it has none) over this tokenizer."""
        try:
            template: ChatTemplate | None = ChatTemplate.from_hf_dir(self.folder)
        except ReftError:
            template = None
        return Prompter(template, self.encode, self.is_eog, self.encode_text)


def token_bytes(spec: dict) -> list[bytes]:
    """Every token's bytes as llama.cpp prints it (control tokens print nothing)."""
    vocab = spec["model"]["vocab"]
    by_id = {int(i): t for t, i in vocab.items()} if isinstance(vocab, dict) else \
        {i: e[0] for i, e in enumerate(vocab)}
    special = set()
    for t in spec.get("added_tokens", []):
        by_id[int(t["id"])] = t["content"]
        if t.get("special"):
            special.add(int(t["id"]))
    byte_level = "ByteLevel" in json.dumps(spec.get("decoder"))
    inverse = {c: b for b, c in _bytes_to_unicode().items()}
    out = [b""] * (max(by_id) + 1)
    for i, t in by_id.items():
        if i in special:
            continue
        if byte_level:
            out[i] = bytes(inverse[ch] for ch in t) if all(ch in inverse for ch in t) else t.encode()
        elif len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            out[i] = bytes([int(t[3:5], 16)])
        else:
            out[i] = t.replace("\u2581", " ").encode()
    return out


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte <-> printable character table (the ByteLevel pre-tokenizer's)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def eog_ids(folder: Path, spec: dict) -> set[int]:
    """eos of the configs, plus special tokens llama.cpp ends generation on."""
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        try:
            v = json.loads((folder / name).read_text()).get("eos_token_id")
        except (OSError, ValueError):
            continue
        ids.update(v if isinstance(v, list) else [v] if isinstance(v, int) else [])
    texts = set(EOG_TEXTS)
    try:
        eos = json.loads((folder / "tokenizer_config.json").read_text()).get("eos_token")
        texts.add(eos.get("content") if isinstance(eos, dict) else eos)
    except (OSError, ValueError):
        pass
    ids.update(int(t["id"]) for t in spec.get("added_tokens", []) if t.get("special") and t["content"] in texts)
    return ids
