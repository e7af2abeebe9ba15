"""An ``edge-reft export-onnx`` folder, read without torch: its manifest, its
tokenizer, and patches laid out as the graph's inputs.

The manifest (``edge_reft_onnx.json``, written by
``edge_reft.converters.onnx_export``) names every input; each edit slot at
block L takes rotate (B, r, d), delta_t = (W - R)^T (B, d, r), bias (B, 1, r)
and mask (B, S, 1), r the export's max rank (zero-padded: zero rows change
nothing).  Several interventions on one block fill its slots in order.
Each block also has a bool input ``reft.L.on``: off, the block runs the
builder's graph unchanged (cheap), so a call turns on only the blocks some
row's mask edits.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from edge_reft.errors import ReftError, ReftFormatError
from edge_reft.patch import BaseModel

from .edits import PatchSet

MANIFEST = "edge_reft_onnx.json"
FORMAT, VERSION = "edge-reft-onnx", 1
# end-of-generation tokens as llama.cpp recognizes them by text (end of turn, FIM pad/repo/sep)
EOG_TEXTS = frozenset({"<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>",
                       "<|endoftext|>", "<EOT>", "_<EOT>", "<｜end▁of▁sentence｜>", "<end_of_utterance>",
                       "<|return|>", "<|call|>", "<|fim_pad|>", "<fim-pad>", "<PAD>", "<|fim_repo|>",
                       "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>", "<|file_sep|>"})


@dataclass(frozen=True)
class Site:
    layer: int
    slot: int
    inputs: dict[str, str]   # rotate, delta_t, bias, mask -> graph input name


class Export:
    """The manifest of an export folder, and patches turned into its inputs."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        try:
            m = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ReftError(f"{self.folder}: not an export-onnx folder ({MANIFEST}: {e}); make one with "
                            "`edge-reft export-onnx MODEL --out DIR`") from None
        problems = []
        if m.get("format") != FORMAT or m.get("version") != VERSION:
            problems.append(f"format/version: {m.get('format')!r} {m.get('version')!r}, expected "
                            f"{FORMAT!r} {VERSION}")
        for k in ("base", "export", "model", "kv_heads", "head_dim", "sites", "switches", "logits_start"):
            if k not in m:
                problems.append(f"{k}: missing")
        if problems:
            raise ReftFormatError(path, problems)
        self.manifest = m
        self.base = BaseModel(**m["base"])
        ex = m["export"]
        self.precision, self.slots, self.max_rank = ex["precision"], int(ex["slots"]), int(ex["max_rank"])
        self.layers = tuple(int(L) for L in ex["layers"])
        self.sites = tuple(Site(int(s["layer"]), int(s["slot"]), dict(s["inputs"])) for s in m["sites"])
        self.site_of = {(s.layer, s.slot): s for s in self.sites}
        self.model_path = self.folder / m["model"]
        self.kv_heads, self.head_dim = int(m["kv_heads"]), int(m["head_dim"])
        self.context_length = int(m.get("context_length", 2048))
        self.logits_start = m["logits_start"]
        self.switches = {int(L): name for L, name in m["switches"].items()}
        self._zeros: dict[tuple[int, int], np.ndarray] = {}
        self._bool = {v: np.array(v) for v in (False, True)}  # shared, so unchanged switches are not re-fed

    # ---- patches -> inputs ---------------------------------------------------------------
    def check(self, pset: PatchSet) -> None:
        """Refuse a patch set this export has no inputs for (lists every problem)."""
        where = [(p.source, i) for p in pset.patches for i in range(len(p.interventions))]
        problems = []
        for L, items in pset.by_layer.items():
            for k, c in enumerate(items):
                src, i = where[c.index]
                if L not in self.layers:
                    problems.append(f"{src}: reft.{i} edits block {L}, but this export has patch inputs at "
                                    f"blocks {list(self.layers)} only; re-export with --layers including "
                                    f"{L}, or --all-layers")
                    break
                if k >= self.slots:
                    problems.append(f"{src}: reft.{i} is intervention {k + 1} on block {L}; the export has "
                                    f"{self.slots} slot(s) per block; re-export with --slots {len(items)}")
                if c.rotate.shape[0] > self.max_rank:
                    problems.append(f"{src}: reft.{i} has rank {c.rotate.shape[0]}, above the export's "
                                    f"--max-rank {self.max_rank}; re-export with --max-rank "
                                    f"{c.rotate.shape[0]} or more")
        if problems:
            raise ReftError(f"{self.folder}: this ONNX export cannot apply the patch:\n"
                            + "\n".join(f"  - {p}" for p in problems))

    def slot_of(self, pset: PatchSet) -> dict[int, Site]:
        """Intervention index -> the site it fills."""
        return {c.index: self.site_of[(L, k)] for L, items in pset.by_layer.items()
                for k, c in enumerate(items)}

    def weights(self, pset: PatchSet) -> dict[str, np.ndarray]:
        """rotate, delta_t and bias of every used site for one sequence (no batch axis)."""
        r, out = self.max_rank, {}
        for index, site in self.slot_of(pset).items():
            c = pset.interventions[index]
            rank, d = c.rotate.shape
            rot, dt, b = np.zeros((r, d), np.float32), np.zeros((d, r), np.float32), np.zeros((1, r), np.float32)
            rot[:rank], dt[:, :rank], b[0, :rank] = c.rotate, c.delta.T, c.bias
            out.update({site.inputs["rotate"]: rot, site.inputs["delta_t"]: dt, site.inputs["bias"]: b})
        return out

    def batch_weights(self, psets: Sequence[PatchSet], d: int) -> dict[str, np.ndarray]:
        """Every site's rotate, delta_t and bias with a batch axis, row b from ``psets[b]``."""
        rows = [self.weights(p) for p in psets]
        r, out = self.max_rank, {}
        for site in self.sites:
            zero = {"rotate": (r, d), "delta_t": (d, r), "bias": (1, r)}
            for kind, shape in zero.items():
                name = site.inputs[kind]
                if any(name in w for w in rows):
                    out[name] = np.stack([w.get(name, np.zeros(shape, np.float32)) for w in rows])
                else:
                    out[name] = np.zeros((len(rows),) + shape, np.float32)
        return out

    def masks(self, psets: Sequence[PatchSet], starts: Sequence[int], n: int,
              n_prompts: Sequence[int]) -> dict[str, np.ndarray]:
        """Every site's (B, n, 1) mask, row b covering positions starts[b]..starts[b]+n-1,
        and every block's switch (on where a mask is non-zero).  Sites no row uses share
        one read-only zero array (cheap to re-feed)."""
        zero = self._zeros.get((len(psets), n))
        if zero is None:
            zero = np.zeros((len(psets), n, 1), np.float32)
            zero.setflags(write=False)
            self._zeros = {(len(psets), n): zero}
        out = {s.inputs["mask"]: zero for s in self.sites}
        for b, (pset, start, n_prompt) in enumerate(zip(psets, starts, n_prompts)):
            if not pset:
                continue
            m = pset.masks(start, n, n_prompt)
            for index, site in self.slot_of(pset).items():
                name = site.inputs["mask"]
                if out[name] is zero:
                    out[name] = np.zeros((len(psets), n, 1), np.float32)
                out[name][b, :, 0] = m[index]
        on = {s.layer for s in self.sites if out[s.inputs["mask"]] is not zero and out[s.inputs["mask"]].any()}
        out.update({name: self._bool[L in on] for L, name in self.switches.items()})
        return out


class Vocab:
    """Tokenization with the ``tokenizers`` library, token bytes and end-of-generation ids."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer
        path = folder / "tokenizer.json"
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
            self.plain = Tokenizer.from_file(str(path))  # a second one: the flag is per instance
            self.plain.encode_special_tokens = True
            spec = json.loads(path.read_text())
        except Exception as e:  # tokenizers raises its own exception type
            raise ReftError(f"{path}: cannot be read as a tokenizer ({e})") from None
        self.pieces = token_bytes(spec)
        self.eog = frozenset(eog_ids(folder, spec))

    def encode(self, text: str, add_special: bool) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special).ids

    def encode_text(self, text: str) -> list[int]:
        """``text`` as plain characters: special-token text in it is not a control token
        (message content; llama.cpp's ``parse_special=False``)."""
        return self.plain.encode(text, add_special_tokens=False).ids


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
