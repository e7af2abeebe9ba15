"""pyreft checkpoints to `.reft` patches and back, without pyreft, pyvene or torch.

A pyreft save folder (``ReftModel.save``) holds ``config.json`` and one
``intkey_<key>.bin`` per intervention; a trainer checkpoint's
``intervenable_model/`` holds the same files without config.json (keys then
come from the file names).  A key names the layer, component and a counter:
``layer_15_comp_block_output_unit_pos_nunit_1#0`` (pyvene >= 0.1.7) or
``layer.15.comp.block_output.unit.pos.nunit.1#0`` (earlier).

What converts (pyreft's forward -> the `.reft` tensors, values kept exactly):

- LoReFT  h + (W h + b - R h) R^T; state {weight W [r,d], bias b [r],
  rotate_layer [d,r] = R^T} -> ``loreft``: rotate = R, weight = W, bias = b.
- NoReFT  h + (W1 h + b1 - (W2 h + b2)) W2; state {proj_layer.weight W2,
  [proj_layer.bias b2], learned_source.weight W1, learned_source.bias b1}
  -> ``noreft``: rotate = W2, weight = W1, bias = b1 - b2.

ConsReFT, LobiReFT, DiReFT and NodiReFT are refused by name, and so is every
component but ``block_output`` of a plain (not PEFT-wrapped) model.
config.json stores neither the positions, nor share_weights, nor act_fn: the
caller gives the first two, and the activation is pyreft's reload default,
the identity (nothing in the files can say otherwise; config.json's
``act_fn``, if some fork writes one, must be absent or ``linear``).  Class
names in config.json are matched as text; nothing named there is imported.

Positions.  Untied ``f<N>+l<M>`` (no share_weights) trains two interventions
per layer, #0 on the first N prompt tokens and #1 on the last M; they become
two interventions with rules ``f<N>`` and ``l<M>``.  The one gap: pyreft caps
each of the two windows at floor(n/2) for a prompt of n tokens, while a
single-window rule caps at n, so on prompts shorter than 2*max(N, M) the
converted patch edits up to min(N, n) (resp. min(M, n)) positions where pyreft
edits min(N, floor(n/2)).  Tied f+l (``share_weights``) keeps pyreft's rule; a single
window differs from pyreft on short prompts in the same way everywhere in edge-reft (FORMAT.md).
Not expressible: pyreft's ReftClassificationDataset, ReftGenerationDataset and
ReftSupervisedDataset end the window at ``prompt_len - 1`` (their ``l<N>`` skips the
last prompt token); format version 1 has no shifted window, so such a patch runs one
token later than it was trained (README, "Converting from pyreft").

The ``.bin`` files are torch pickles, read by ``torch_pickle.read_state_dict``
(no torch, nothing in them executed); ``to_pyreft`` (the reverse) needs torch.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_reft import spec
from edge_reft.errors import ReftError, ReftFormatError
from edge_reft.files import atomic_dir
from edge_reft.fingerprint import base_model
from edge_reft.outputs import check_output
from edge_reft.patch import BaseModel, Intervention, Patch
from edge_reft.positions import PositionRule
from edge_reft.reftfile import load_patch, save_patch

from .torch_pickle import FLOATING, StoredTensor, archive_storage_count, read_state_dict

MAX_CONFIG_BYTES = 4 << 20

@dataclass(frozen=True)
class PyreftKey:
    """One intervention key of pyvene: ``layer_15_comp_block_output_unit_pos_nunit_1#0``."""
    text: str
    layer: int
    component: str
    unit: str
    nunit: int
    index: int  # pyvene's collision counter: #0, #1 for a layer listed twice


_KEYS = (re.compile(r"layer_(\d{1,6})_comp_(.+?)_unit_(.+?)_nunit_(\d{1,6})#(\d{1,6})"),       # pyvene >= 0.1.7
         re.compile(r"layer\.(\d{1,6})\.comp\.(.+?)\.unit\.(.+?)\.nunit\.(\d{1,6})#(\d{1,6})"))  # earlier


def parse_key(text: str) -> PyreftKey:
    for pattern in _KEYS:
        m = pattern.fullmatch(text)
        if m:
            key = PyreftKey(text, int(m[1]), m[2], m[3], int(m[4]), int(m[5]))
            if key.component != "block_output":
                raise ReftError(f"key {text!r}: component {key.component!r} cannot be converted "
                                "(a .reft patch edits block_output, the residual stream after a block)")
            if key.unit != "pos" or key.nunit != 1:
                raise ReftError(f"key {text!r}: unit {key.unit!r} x {key.nunit}, expected 'pos' x 1")
            return key
    hint = (" (a module-path component: a PEFT-wrapped or custom model, not block_output)"
            if text.startswith("comp") else "")
    raise ReftError(f"key {text!r}: not a pyvene key like 'layer_15_comp_block_output_unit_pos_"
                    f"nunit_1#0'{hint}")


PYREFT_CLASSES = {"LoreftIntervention": "loreft", "NoreftIntervention": "noreft"}
REFUSED_CLASSES = {"ConsreftIntervention": "ConsReFT", "LobireftIntervention": "LobiReFT",
                   "DireftIntervention": "DiReFT", "NodireftIntervention": "NodiReFT"}
LOREFT_KEYS = {"weight", "bias", "rotate_layer"}
NOREFT_KEYS = {"proj_layer.weight", "learned_source.weight", "learned_source.bias"}
BUFFERS = {"embed_dim", "interchange_dim"}  # nn.Module.state_dict() of pyreft's other classes


def _type_from_class(text: Any) -> str:
    """'loreft' / 'noreft' from config.json's "<class 'pyreft.interventions.X'>" (never imported)."""
    m = re.fullmatch(r"<class 'pyreft\.interventions\.(\w+)'>", text) if isinstance(text, str) else None
    if m and m[1] in PYREFT_CLASSES:
        return PYREFT_CLASSES[m[1]]
    if m and m[1] in REFUSED_CLASSES:
        raise ReftError(f"intervention type {REFUSED_CLASSES[m[1]]} ({text}) cannot be converted: "
                        "a .reft patch holds LoReFT and NoReFT interventions")
    raise ReftError(f"intervention type {text!r:.120} is not a pyreft LoreftIntervention or "
                    "NoreftIntervention")


def _type_from_tensors(state: dict[str, StoredTensor]) -> str:
    """'loreft', or 'noreft|nodireft' (same tensors), from the state dict's names."""
    names = set(state) - BUFFERS
    if names == LOREFT_KEYS:
        return "loreft"
    if NOREFT_KEYS <= names <= NOREFT_KEYS | {"proj_layer.bias"}:
        return "noreft|nodireft"
    if "rotate_layer.parametrizations.weight.original" in names:
        kind = "DiReFT" if "learned_source.weight" in names else "ConsReFT or LobiReFT"
        raise ReftError(f"tensors {sorted(names)} are those of a {kind} intervention, which cannot "
                        "be converted (a .reft patch holds LoReFT and NoReFT interventions)")
    raise ReftError(f"tensors {sorted(state)}: not a pyreft LoReFT ({sorted(LOREFT_KEYS)}) or "
                    f"NoReFT ({sorted(NOREFT_KEYS)}) state dict")


def _tensors(state: dict[str, StoredTensor], itype: str,
             n_embd: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(R, W, b, storage dtype) of one intervention, every shape checked against n_embd."""
    if itype == "loreft":
        roles = {"weight": "rd", "bias": "r", "rotate_layer": "dr"}
    else:
        roles = {"learned_source.weight": "rd", "learned_source.bias": "r", "proj_layer.weight": "rd"}
        roles.update({"proj_layer.bias": "r"} if "proj_layer.bias" in state else {})
    w = next(iter(roles))
    if state[w].values.ndim != 2:
        raise ReftError(f"{w}: shape {state[w].values.shape}, expected (rank, n_embd)")
    r, d = state[w].values.shape
    if d != n_embd:
        raise ReftError(f"{w}: shape {(r, d)}: hidden size {d}, but the base model has n_embd "
                        f"{n_embd} (was this checkpoint trained on another model?)")
    problems = []
    for name, dims in roles.items():
        want, t = tuple({"r": r, "d": d}[c] for c in dims), state[name]
        if t.dtype not in FLOATING:
            problems.append(f"{name}: {t.dtype} tensor, expected floating point")
        elif t.values.shape != want:
            problems.append(f"{name}: shape {t.values.shape}, expected {want} (rank {r}, n_embd {d})")
    if problems:
        raise ReftError("; ".join(problems))
    dtypes = {state[n].dtype for n in roles}
    if itype == "loreft":
        rot, weight, bias = state["rotate_layer"].values.T, state["weight"].values, state["bias"].values
    else:
        rot, weight = state["proj_layer.weight"].values, state["learned_source.weight"].values
        bias = state["learned_source.bias"].values
        if "proj_layer.bias" in state:  # W1 h + b1 - (W2 h + b2): one bias b1 - b2, float32
            bias, dtypes = bias - state["proj_layer.bias"].values, {"float32"}
    # a patch stores 16-bit values losslessly only when all three are of that one type
    dtype = {"bfloat16": spec.GGML_BF16, "float16": spec.GGML_F16}.get(dtypes.pop(), spec.GGML_F32) \
        if len(dtypes) == 1 else spec.GGML_F32
    return rot, weight, bias, dtype


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refused when a key repeats (json.loads would keep the last silently)."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r:.80} appears twice in one object")
        out[k] = v
    return out


def _read_config(folder: Path) -> dict[str, Any] | None:
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ValueError(f"larger than {MAX_CONFIG_BYTES} bytes")
        config = json.loads(path.read_bytes(), object_pairs_hook=_unique_keys)
    except (OSError, ValueError, RecursionError) as e:
        raise ReftFormatError(path, f"file: not readable JSON ({e})") from None
    if not isinstance(config, dict):
        raise ReftFormatError(path, "file: expected a JSON object (pyvene's IntervenableConfig)")
    return config


def _keys_and_types(folder: Path, config: dict[str, Any] | None,
                    problems: list[str]) -> list[tuple[str, str | None]]:
    """(key, intervention type or None) in pyvene's order: config.json's, else (#n, layer)."""
    files = sorted(p.name[len("intkey_"):-len(".bin")] for p in folder.glob("intkey_*.bin"))
    if config is None or not isinstance(config.get("sorted_keys"), list):
        def order(k: str) -> tuple[int, int]:
            try:
                key = parse_key(k)
            except ReftError:
                return (1 << 30, 0)  # reported when the file is read
            return (key.index, key.layer)
        return [(k, None) for k in sorted(files, key=order)]
    where = f"{folder / 'config.json'}"
    keys, types = config["sorted_keys"], config.get("intervention_types")
    # each key names a file read in full: a key listed 200 times would read it 200 times
    if len(keys) > spec.MAX_INTERVENTIONS or not all(isinstance(k, str) for k in keys):
        problems.append(f"{where}: sorted_keys: expected at most {spec.MAX_INTERVENTIONS} strings, "
                        f"found {len(keys)} entries")
        return []
    repeated = sorted(k for k, n in Counter(keys).items() if n > 1)
    if repeated:
        problems.append(f"{where}: sorted_keys: {repeated[0]!r:.120} is listed {keys.count(repeated[0])} "
                        "times; each intervention key must appear once")
        return []
    if not isinstance(types, list) or len(types) != len(keys):
        problems.append(f"{where}: intervention_types: expected one per sorted_keys entry ({len(keys)})")
        types = [None] * len(keys)
    if config.get("act_fn") not in (None, "linear"):
        problems.append(f"{where}: act_fn: {config['act_fn']!r}; only the identity ('linear') converts")
    problems += [f"{folder / f'intkey_{k}.bin'}: not listed in config.json's sorted_keys"
                 for k in files if k not in keys]
    out = []
    for k, t in zip(keys, types):
        try:
            out.append((str(k), None if t is None else _type_from_class(t)))
        except ReftError as e:
            problems.append(f"{where}: {k}: {e}")
    return out


def _rules(keys: list[PyreftKey], rule: PositionRule, share_weights: bool) -> list[PositionRule]:
    """Each intervention's rule: pyreft's one setting, split into f and l when untied."""
    untied = bool(rule.first and rule.last and not share_weights)
    per_layer: dict[int, list[int]] = {}
    for k in keys:
        per_layer.setdefault(k.layer, []).append(k.index)
    want = [0, 1] if untied else [0]
    for layer, found in sorted(per_layer.items()):
        if sorted(found) == want:
            continue
        if untied:
            hint = f"untied {rule} (no --share-weights) trains two per layer: #0 first, #1 last tokens"
        elif sorted(found) == [0, 1]:
            hint = "pyreft trains two per layer for untied f<N>+l<M>: pass those --positions, no --share-weights"
        else:
            hint = "expected one per layer"
        raise ReftError(f"layer {layer} has interventions {', '.join(f'#{i}' for i in sorted(found))}; {hint}")
    if not untied:
        return [rule] * len(keys)
    return [PositionRule(first=rule.first) if k.index == 0 else PositionRule(last=rule.last) for k in keys]


def find_checkpoint(folder: str | os.PathLike[str]) -> Path:
    """The folder that holds the intkey files: ``folder`` or its ``intervenable_model/``."""
    d = Path(folder)
    if not d.is_dir():
        raise ReftError(f"{d}: not a folder (expected a pyreft save folder with intkey_*.bin files)")
    if not any(d.glob("intkey_*.bin")) and (d / "intervenable_model").is_dir():
        d = d / "intervenable_model"
    if not any(d.glob("intkey_*.bin")):
        raise ReftError(f"{d}: no intkey_*.bin files (expected a folder written by ReftModel.save "
                        "or a trainer checkpoint's intervenable_model/)")
    return d


def from_pyreft(folder: str | os.PathLike[str], base: BaseModel, positions: str, share_weights: bool = False,
                *, name: str = "", intervention_type: str | None = None) -> Patch:
    """A Patch from a pyreft checkpoint folder; every problem found is reported in one error."""
    rule = PositionRule.parse(positions)
    d = find_checkpoint(folder)
    config, problems = _read_config(d), []
    listed = _keys_and_types(d, config, problems)
    model_bin = d / "pytorch_model.bin"
    if model_bin.is_file() and archive_storage_count(model_bin):
        problems.append(f"{model_bin}: holds trained model weights (LoRA?): a .reft patch carries "
                        "only the interventions, so converting would drop them")
    keys, found = [], []
    for text, config_type in listed:
        path = d / f"intkey_{text}.bin"
        try:
            key = parse_key(text)
            if key.layer >= base.n_layer:
                raise ReftError(f"layer {key.layer}: the base model has blocks 0..{base.n_layer - 1}")
            if not path.is_file():
                raise ReftError("file missing (listed in config.json's sorted_keys)")
            state = read_state_dict(path)
            itype = _type_from_tensors(state)
            itype = _resolve_type(itype, config_type or intervention_type)
            keys.append(key)
            found.append((itype, *_tensors(state, itype, base.n_embd)))
        except ReftFormatError as e:  # the archive's own problems name its path already
            problems += [f"{e.path}: {p}" for p in e.problems]
        except ReftError as e:
            problems.append(f"{path}: {e}")
    if not problems:
        try:
            rules = _rules(keys, rule, share_weights)
        except ReftError as e:
            problems.append(f"{d}: {e}")
    if problems:
        raise ReftFormatError(d, problems)
    ivs = [Intervention(k.layer, r, rot, w, b, itype, "block_output", dt)
           for k, r, (itype, rot, w, b, dt) in zip(keys, rules, found)]
    provenance = {"converted_from": "pyreft", "pyreft_keys": [k.text for k in keys],
                  "pyreft_positions": positions, "pyreft_share_weights": share_weights}
    if config and isinstance(config.get("transformers_version"), str):
        provenance["pyreft_transformers_version"] = config["transformers_version"]
    return Patch(base, tuple(ivs), name or d.name, f"converted from the pyreft checkpoint {d.name}",
                 provenance, source=str(d))


def _resolve_type(from_tensors: str, declared: str | None) -> str:
    if from_tensors == "loreft" and declared in (None, "loreft"):
        return "loreft"
    if from_tensors == "noreft|nodireft" and declared == "noreft":
        return "noreft"
    if from_tensors == "noreft|nodireft" and declared is None:
        raise ReftError("NoReFT and NodiReFT store the same tensors and there is no config.json to "
                        "tell them apart: pass --type noreft if this is NoReFT (NodiReFT cannot be converted)")
    raise ReftError(f"the tensors are those of {from_tensors.replace('|', ' or ')}, but the "
                    f"declared type is {declared}")


def convert(folder: str | os.PathLike[str], base: str | os.PathLike[str], out: str | os.PathLike[str],
            positions: str, share_weights: bool = False, *, name: str = "",
            intervention_type: str | None = None, force: bool = False) -> Patch:
    """Convert a pyreft checkpoint for the model ``base`` (.gguf or HF folder); write ``out``
    atomically and return the patch as read back from it."""
    check_output(out, [folder, base], force=force)
    patch = from_pyreft(folder, base_model(base), positions, share_weights, name=name,
                        intervention_type=intervention_type)
    return load_patch(save_patch(patch, out))


# ---- .reft -> pyreft ------------------------------------------------------------------------

def pyreft_positions(patch: Patch) -> tuple[str, bool]:
    """The pyreft (positions, share_weights) that reproduces the patch's position rules."""
    rules = [iv.positions for iv in patch.interventions]
    layers = Counter(iv.layer for iv in patch.interventions)
    if len(set(rules)) == 1 and max(layers.values()) == 1:
        return str(rules[0]), bool(rules[0].first and rules[0].last)
    by_layer: dict[int, list[PositionRule]] = {}
    for iv in patch.interventions:
        by_layer.setdefault(iv.layer, []).append(iv.positions)
    pairs = {tuple(v) for v in by_layer.values()}
    pair = pairs.pop() if len(pairs) == 1 else ()
    if len(pair) == 2 and pair[0].first and not pair[0].last and pair[1].last and not pair[1].first:
        return f"f{pair[0].first}+l{pair[1].last}", False
    raise ReftError(f"{patch.source}: pyreft applies one position setting to every intervention; "
                    f"these rules ({', '.join(f'layer {iv.layer}: {iv.positions}' for iv in patch.interventions)}) "
                    "are neither one rule with one intervention per layer nor untied f<N>/l<M> pairs")


def to_pyreft(patch: Patch, folder: str | os.PathLike[str]) -> tuple[str, bool]:
    """Write ``patch`` as a pyreft save folder (pyvene 0.1.8 layout; needs torch) into a new or
    empty ``folder``; return the (positions, share_weights) to load it with."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ReftError("to-pyreft writes torch.save files and needs torch: pip install torch") from None
    positions, share_weights = pyreft_positions(patch)
    out = Path(folder)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ReftError(f"{out}: exists and is not an empty folder; to-pyreft writes a new folder")
    check_output(out, [patch.source], folder=True, flag="--out")
    with atomic_dir(out, replace=True) as tmp:  # replaces at most an empty folder
        _write_pyreft(patch, tmp)
    return positions, share_weights


def _write_pyreft(patch: Patch, tmp: Path) -> None:
    import torch

    counter: Counter[int] = Counter()
    config: dict[str, Any] = {"intervention_constant_sources": [], "intervention_dimensions": [],
                              "intervention_types": [], "mode": "parallel", "representations": [],
                              "sorted_keys": []}
    for iv in patch.interventions:
        key = f"layer_{iv.layer}_comp_block_output_unit_pos_nunit_1#{counter[iv.layer]}"
        counter[iv.layer] += 1
        dtype = {spec.GGML_F16: torch.float16, spec.GGML_BF16: torch.bfloat16}.get(iv.dtype, torch.float32)
        t = lambda a: torch.from_numpy(np.array(a, dtype=np.float32)).to(dtype)  # noqa: E731 (lossless)
        if iv.type == "loreft":  # LoreftIntervention.state_dict(): Linear's, then R^T
            state = OrderedDict(weight=t(iv.weight), bias=t(iv.bias), rotate_layer=t(iv.rotate.T))
        else:  # NoreftIntervention: nn.Module.state_dict(), no proj_layer bias
            dim = torch.tensor(patch.base.n_embd)
            state = OrderedDict([("embed_dim", dim), ("interchange_dim", dim.clone()),
                                 ("proj_layer.weight", t(iv.rotate)),
                                 ("learned_source.weight", t(iv.weight)), ("learned_source.bias", t(iv.bias))])
        torch.save(state, tmp / f"intkey_{key}.bin")
        cls = {"loreft": "LoreftIntervention", "noreft": "NoreftIntervention"}[iv.type]
        config["intervention_types"].append(f"<class 'pyreft.interventions.{cls}'>")
        config["intervention_dimensions"].append(patch.base.n_embd)
        config["intervention_constant_sources"].append(True)
        config["representations"].append([iv.layer, "block_output", "pos", 1, iv.rank] + [None] * 9)
        config["sorted_keys"].append(key)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
