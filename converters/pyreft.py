"""pyreft checkpoints to `.reft` patches and back, without pyreft, pyvene or torch.

A pyreft save folder (``ReftModel.save``) holds ``config.json`` and one
``intkey_<key>.bin`` per intervention; a trainer checkpoint's
``intervenable_model/`` holds the same files without config.json (keys then
come from the file names).  A key names the layer, component and a counter:
``layer_15_comp_block_output_unit_pos_nunit_1#0`` (pyvene >= 0.1.7) or
``layer.15.comp.block_output.unit.pos.nunit.1#0`` (earlier).

Types.  All six pyreft classes convert (``edge_reft.interventions`` has their
math; ``pyreft_layout`` their files).  config.json names each class; without it
the tensors do, except that NoReFT/NodiReFT and ConsReFT/LobiReFT save the same
tensors (``--type`` then decides).  config.json stores no activation: pyreft's
default, the identity, is assumed (an ``act_fn`` key must be absent or ``linear``).
pyreft evaluates DiReFT's and NodiReFT's W h in learned_source's dtype
(bfloat16 unless the run passed another); edge-reft computes in float32.
Class names in config.json are matched as text; nothing named there is imported.

Positions.  pyreft saves neither the positions nor which data module placed
them, so the caller says both: ``positions`` (and ``share_weights``), and the
dataset convention (``CONVENTIONS``), which become exact format-2 rules: pyreft
caps every window at floor(m/2), m being ``last_position`` (the prompt length n,
or n - 1 for ReftSupervisedDataset and its siblings), so ``l4`` becomes ``f0+l4``
(or ``f0+l4:-1``), and untied ``f<N>+l<M>`` (two interventions per layer, #0 on
the first window, #1 on the last) becomes ``f<N>+l0`` and ``f0+l<M>``.

The ``.bin`` files are torch pickles, read by ``torch_pickle.read_state_dict``
(no torch, nothing in them executed); ``to_pyreft`` (the reverse) needs torch.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_reft import interventions as types
from edge_reft import spec
from edge_reft.errors import ReftError, ReftFormatError
from edge_reft.files import atomic_dir
from edge_reft.fingerprint import base_model
from edge_reft.outputs import check_output
from edge_reft.patch import BaseModel, Intervention, Patch
from edge_reft.positions import PositionRule
from edge_reft.reftfile import load_patch, save_patch

from . import pyreft_layout as layout
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


# the data module that placed a checkpoint's intervention locations -> (what it means, end offset)
CONVENTIONS = {
    "end": ("the windows end at the prompt's end, each capped at floor(n/2): pyreft's "
            "get_intervention_locations with last_position = n, as in make_multiple_position_"
            "supervised_data_module, ReftRawDataset and ReftPreferenceDataset", 0),
    "end-1": ("the windows end before the prompt's last token (last_position = n - 1): pyreft's "
              "ReftClassificationDataset, ReftGenerationDataset and ReftSupervisedDataset", 1),
    "last-token": ("the prompt's last token, uncapped: make_last_position_supervised_data_module "
                   "and its _chat_ twin (positions l1)", 0),
}
DEFAULT_CONVENTION = "end"


def _type_from_class(text: Any) -> str:
    """The type from config.json's "<class 'pyreft.interventions.X'>" (never imported)."""
    m = re.fullmatch(r"<class 'pyreft\.interventions\.(\w+)'>", text) if isinstance(text, str) else None
    if m and m[1] in types.BY_PYREFT:
        return types.BY_PYREFT[m[1]].name
    raise ReftError(f"intervention type {text!r:.120} is not one of pyreft's classes "
                    f"({', '.join(types.BY_PYREFT)})")


def _tensors(state: dict[str, StoredTensor], declared: str | None,
             n_embd: int) -> tuple[str, np.ndarray, np.ndarray | None, np.ndarray, int]:
    """(type, R, W or None, b, storage dtype) of one intervention, every shape checked."""
    lay = layout.layout_of(set(state))
    itype = _resolve_type(lay.types, declared)
    names = [k for k in state if k not in layout.BUFFERS]
    bad = [f"{k}: {state[k].dtype} tensor, expected floating point" for k in names
           if state[k].dtype not in FLOATING]
    if bad:
        raise ReftError("; ".join(bad))
    arrays = {k: state[k].values for k in names}
    layout.check_shapes(lay, arrays, n_embd)
    rotate, weight, bias, exact = layout.read(itype, arrays)
    used = [k for k in names if not (k == "proj_layer.bias" and itype == "nodireft")]
    return itype, rotate, weight, bias, layout.storage_dtype({state[k].dtype for k in used}, exact)


def _resolve_type(candidates: tuple[str, ...], declared: str | None) -> str:
    if declared is not None:
        if declared in candidates:
            return declared
        raise ReftError(f"the tensors are those of {' or '.join(types.TYPES[t].pyreft for t in candidates)}, "
                        f"but the declared type is {declared}")
    if len(candidates) == 1:
        return candidates[0]
    a, b = candidates
    raise ReftError(f"{types.TYPES[a].pyreft} and {types.TYPES[b].pyreft} save the same tensors and "
                    f"there is no config.json to tell them apart: pass --type {a} or --type {b}")


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


def pyreft_rules(positions: str, untied: bool, convention: str) -> tuple[PositionRule, ...]:
    """The exact rules of pyreft's ``positions`` under ``convention``: one rule, or (first window,
    last window) for an untied f<N>+l<M> (two interventions per layer)."""
    if convention not in CONVENTIONS:
        raise ReftError(f"dataset convention {convention!r}: expected one of {', '.join(CONVENTIONS)}")
    rule = PositionRule.parse(positions)
    if rule.all or rule.end or (rule.paired and not (rule.first and rule.last)):
        raise ReftError(f"positions {positions!r}: pyreft's --positions are 'f<N>', 'l<N>' or 'f<N>+l<M>'")
    if convention == "last-token":
        if str(rule) != "l1":
            raise ReftError(f"positions {positions!r}: make_last_position_supervised_data_module "
                            "edits the last prompt token only; pass --positions l1")
        return (rule,)
    end = CONVENTIONS[convention][1]
    if untied:
        return (PositionRule(rule.first, 0, paired=True, end=end), PositionRule(0, rule.last, paired=True, end=end))
    return (PositionRule(rule.first, rule.last, paired=True, end=end),)


def _untied(positions: str, share_weights: bool) -> bool:
    """pyreft trains two interventions per layer: f<N>+l<M> without share_weights."""
    rule = PositionRule.parse(positions)
    return bool(rule.first and rule.last and not share_weights)


def _rules(keys: list[PyreftKey], positions: str, untied: bool,
           rules: tuple[PositionRule, ...]) -> list[PositionRule]:
    """Each intervention's rule (``rules`` from ``pyreft_rules``), its layer's count checked."""
    per_layer: dict[int, list[int]] = {}
    for k in keys:
        per_layer.setdefault(k.layer, []).append(k.index)
    want = [0, 1] if untied else [0]
    for layer, found in sorted(per_layer.items()):
        if sorted(found) == want:
            continue
        if untied:
            hint = f"untied {positions} (no --share-weights) trains two per layer: #0 first, #1 last tokens"
        elif sorted(found) == [0, 1]:
            hint = "pyreft trains two per layer for untied f<N>+l<M>: pass those --positions, no --share-weights"
        else:
            hint = "expected one per layer"
        raise ReftError(f"layer {layer} has interventions {', '.join(f'#{i}' for i in sorted(found))}; {hint}")
    return [rules[k.index] if untied else rules[0] for k in keys]


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
                *, convention: str | None = None, name: str = "", intervention_type: str | None = None) -> Patch:
    """A Patch from a pyreft checkpoint folder; every problem found is reported in one error.
    ``convention`` (``CONVENTIONS``) None: DEFAULT_CONVENTION, with a warning (pyreft saves none)."""
    if convention is None:
        warnings.warn(f"pyreft does not record which data module placed the intervention positions; "
                      f"assuming --dataset-convention {DEFAULT_CONVENTION} ({CONVENTIONS[DEFAULT_CONVENTION][0]}). "
                      "Pass --dataset-convention end-1 for ReftSupervisedDataset and its siblings, "
                      "last-token for make_last_position_supervised_data_module", stacklevel=2)
        convention = DEFAULT_CONVENTION
    if intervention_type is not None and intervention_type not in types.TYPES:
        raise ReftError(f"--type {intervention_type!r}: expected one of {', '.join(types.TYPES)}")
    untied = _untied(positions, share_weights)
    exact_rules = pyreft_rules(positions, untied, convention)  # the arguments' own errors first
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
            keys.append(key)
            found.append(_tensors(state, config_type or intervention_type, base.n_embd))
        except ReftFormatError as e:  # the archive's own problems name its path already
            problems += [f"{e.path}: {p}" for p in e.problems]
        except ReftError as e:
            problems.append(f"{path}: {e}")
    if not problems:
        try:
            rules = _rules(keys, positions, untied, exact_rules)
        except ReftError as e:
            problems.append(f"{d}: {e}")
    if problems:
        raise ReftFormatError(d, problems)
    ivs = [Intervention(k.layer, r, rot, w, b, itype, "block_output", dt)
           for k, r, (itype, rot, w, b, dt) in zip(keys, rules, found)]
    provenance = {"converted_from": "pyreft", "pyreft_keys": [k.text for k in keys],
                  "pyreft_positions": positions, "pyreft_share_weights": share_weights,
                  "pyreft_dataset_convention": convention}
    if config and isinstance(config.get("transformers_version"), str):
        provenance["pyreft_transformers_version"] = config["transformers_version"]
    return Patch(base, tuple(ivs), name or d.name, f"converted from the pyreft checkpoint {d.name}",
                 provenance, source=str(d))


def convert(folder: str | os.PathLike[str], base: str | os.PathLike[str], out: str | os.PathLike[str],
            positions: str, share_weights: bool = False, *, convention: str | None = None, name: str = "",
            intervention_type: str | None = None, force: bool = False) -> Patch:
    """Convert a pyreft checkpoint for the model ``base`` (.gguf or HF folder); write ``out``
    atomically and return the patch as read back from it."""
    check_output(out, [folder, base], force=force)
    patch = from_pyreft(folder, base_model(base), positions, share_weights, convention=convention,
                        name=name, intervention_type=intervention_type)
    return load_patch(save_patch(patch, out))


# ---- .reft -> pyreft ------------------------------------------------------------------------

@dataclass(frozen=True)
class PyreftSetting:
    """How to load a patch written by ``to_pyreft`` in pyreft: its positions, share_weights and
    dataset convention, and whether pyreft then edits exactly what edge-reft edits."""
    positions: str
    share_weights: bool
    convention: str
    exact: bool

    def __str__(self) -> str:
        note = "" if self.exact else (" (approximate: these rules cap a lone window at n where pyreft "
                                      "caps it at floor(n/2), so prompts shorter than twice the window "
                                      "are edited differently)")
        return (f"positions={self.positions!r}, share_weights={self.share_weights}, with "
                f"{CONVENTIONS[self.convention][0]}{note}")


def pyreft_positions(patch: Patch) -> PyreftSetting:
    """The pyreft setting that reproduces the patch's position rules."""
    by_layer: dict[int, list[PositionRule]] = {}
    for iv in patch.interventions:
        by_layer.setdefault(iv.layer, []).append(iv.positions)
    groups = {tuple(v) for v in by_layer.values()}
    group = groups.pop() if len(groups) == 1 else ()
    ends = {r.end for r in group}
    fail = ReftError(
        f"{patch.source}: pyreft applies one position setting to every intervention; these rules "
        f"({', '.join(f'layer {iv.layer}: {iv.positions}' for iv in patch.interventions)}) are "
        "neither one rule with one intervention per layer nor untied f<N>/l<M> pairs, ending at the "
        "prompt's end or one token before it")
    if not group or len(ends) != 1 or ends.pop() not in (0, 1) or any(r.all for r in group):
        raise fail
    end = group[0].end
    convention = "end-1" if end else "end"
    if len(group) == 1:
        r = group[0]
        if str(r) == "l1":
            return PyreftSetting("l1", False, "last-token", True)
        text = "+".join(([f"f{r.first}"] if r.first else []) + ([f"l{r.last}"] if r.last else []))
        return PyreftSetting(text, bool(r.first and r.last), convention, r.paired)
    a, b = group if len(group) == 2 else (None, None)
    if a is None or not (a.first and not a.last and b.last and not b.first):
        raise fail
    return PyreftSetting(f"f{a.first}+l{b.last}", False, convention, a.paired and b.paired)


def to_pyreft(patch: Patch, folder: str | os.PathLike[str]) -> PyreftSetting:
    """Write ``patch`` as a pyreft save folder (pyvene 0.1.8 layout; needs torch) into a new or
    empty ``folder``; return the setting to load it with."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ReftError("to-pyreft writes torch.save files and needs torch: pip install torch") from None
    setting = pyreft_positions(patch)
    out = Path(folder)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ReftError(f"{out}: exists and is not an empty folder; to-pyreft writes a new folder")
    check_output(out, [patch.source], folder=True, flag="--out")
    with atomic_dir(out, replace=True) as tmp:  # replaces at most an empty folder
        _write_pyreft(patch, tmp)
    return setting


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
        state = OrderedDict()
        for k, v in layout.write(iv.type, iv.rotate, iv.weight, iv.bias, patch.base.n_embd).items():
            if isinstance(v, int):  # pyvene's embed_dim / interchange_dim buffers
                state[k] = torch.tensor(v)
            else:  # lossless: the patch's values are of the storage type (the parametrization: float32)
                t = torch.from_numpy(np.array(v, dtype=np.float32))
                state[k] = t if k.startswith("rotate_layer.parametrizations") else t.to(dtype)
        torch.save(state, tmp / f"intkey_{key}.bin")
        config["intervention_types"].append(f"<class 'pyreft.interventions.{types.TYPES[iv.type].pyreft}'>")
        config["intervention_dimensions"].append(patch.base.n_embd)
        config["intervention_constant_sources"].append(True)
        config["representations"].append([iv.layer, "block_output", "pos", 1, iv.rank] + [None] * 9)
        config["sorted_keys"].append(key)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
