"""``edge-reft inspect FILE [--json]``: a patch's contents, or a model's identity."""
from __future__ import annotations

import json
import os
from typing import Any

from edge_reft import spec
from edge_reft.errors import ReftFormatError
from edge_reft.fingerprint import MODEL_CHECK_LIMITS, MODEL_LIMITS, from_gguf, gguf_metadata
from edge_reft.ggufscan import read_metadata
from edge_reft.patch import Patch
from edge_reft.reftfile import load_patch

from .common import verb_parser


def patch_record(p: Patch) -> dict[str, Any]:
    """A patch as the flat key -> value record of the format (plus size facts)."""
    rec: dict[str, Any] = {
        "file": p.source, "bytes": os.path.getsize(p.source) if os.path.exists(p.source) else None,
        "parameters": p.n_params,
        spec.GENERAL_TYPE: spec.GENERAL_TYPE_VALUE, spec.ADAPTER_TYPE: spec.ADAPTER_TYPE_VALUE,
        spec.REFT_VERSION_KEY: p.version, spec.GENERAL_ARCHITECTURE: p.base.architecture,
        spec.BASE_N_EMBD: p.base.n_embd, spec.BASE_N_LAYER: p.base.n_layer,
        spec.BASE_FINGERPRINT: p.base.fingerprint, spec.BASE_NAME: p.base.name,
        spec.COUNT: len(p.interventions),
    }
    if p.name:
        rec[spec.GENERAL_NAME] = p.name
    if p.description:
        rec[spec.GENERAL_DESCRIPTION] = p.description
    for i, iv in enumerate(p.interventions):
        rec.update({spec.key(i, spec.TYPE): iv.type, spec.key(i, spec.LAYER): iv.layer,
                    spec.key(i, spec.COMPONENT): iv.component,
                    spec.key(i, spec.POSITIONS): str(iv.positions), spec.key(i, spec.RANK): iv.rank,
                    spec.key(i, "dtype"): spec.TENSOR_DTYPES[iv.dtype]})
    rec.update({spec.TRAIN_PREFIX + k: v for k, v in p.provenance.items()})
    return rec


def format_patch(p: Patch) -> str:
    rec = patch_record(p)
    size = f"{rec['bytes']:,} bytes, " if rec["bytes"] is not None else ""
    lines = [f"patch        {p.source}  ({size}{p.n_params:,} parameters)"]
    if p.name:
        lines.append(f"name         {p.name}")
    if p.description:
        lines.append(f"description  {p.description}")
    lines += [f"base         {p.base.name or '?'} ({p.base.architecture}, n_embd {p.base.n_embd}, "
              f"n_layer {p.base.n_layer})",
              f"fingerprint  {p.base.fingerprint}",
              f"format       reft.version {p.version} (the lowest version that holds this patch)", "",
              f"{'#':>3}  {'type':<8} {'layer':>5}  {'component':<13} {'positions':<10} {'rank':>4}  dtype"]
    for i, iv in enumerate(p.interventions):
        lines.append(f"{i:>3}  {iv.type:<8} {iv.layer:>5}  {iv.component:<13} {str(iv.positions):<10} "
                     f"{iv.rank:>4}  {spec.TENSOR_DTYPES[iv.dtype]}")
    from edge_reft.interventions import TYPES
    lines.append("")
    lines += [f"  {t:<10} {TYPES[t].formula}" for t in dict.fromkeys(iv.type for iv in p.interventions)]
    rules = dict.fromkeys(iv.positions for iv in p.interventions)
    lines += [f"  {str(r):<10} {r.describe()}" for r in rules]
    if p.provenance:
        lines += ["", "provenance"]
        lines += [f"  {k:<20} {v}" for k, v in p.provenance.items()]
    return "\n".join(lines)


def model_record(path: str) -> dict[str, Any]:
    """A model's identity, after checking that every tensor's data lies inside the file (a
    truncated download must be reported, not fingerprinted as fine)."""
    read_metadata(path, MODEL_CHECK_LIMITS)
    b = from_gguf(path)
    g = gguf_metadata(path)
    ft = g.fields.get("general.file_type")
    return {"file": path, "bytes": os.path.getsize(path), "name": b.name,
            "architecture": b.architecture, "n_embd": b.n_embd, "n_layer": b.n_layer,
            "fingerprint": b.fingerprint, "file_type": ft.value if ft is not None else None}


def is_patch(path: str) -> bool:
    """True for a `.reft` (adapter.type = reft); False for a model GGUF."""
    g = read_metadata(path, MODEL_LIMITS)
    t = g.fields.get(spec.ADAPTER_TYPE)
    if t is not None and t.value == spec.ADAPTER_TYPE_VALUE:
        return True
    gt = g.fields.get(spec.GENERAL_TYPE)
    if gt is not None and gt.value == spec.GENERAL_TYPE_VALUE:
        raise ReftFormatError(path, f"{spec.ADAPTER_TYPE}: {t.value if t else None!r} — an adapter "
                                    "of another kind (LoRA?), not a ReFT patch")
    return False


def main(argv: list[str]) -> int:
    ap = verb_parser("inspect", __doc__, "edge-reft inspect me.reft --json")
    ap.add_argument("file", help="a .reft patch or a model .gguf")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    ap.add_argument("--max-bytes", type=int, default=spec.DEFAULT_MAX_BYTES,
                    help="refuse patches larger than this (default 16 MiB)")
    a = ap.parse_args(argv)
    if is_patch(a.file):
        p = load_patch(a.file, max_bytes=a.max_bytes)
        print(json.dumps(patch_record(p), indent=2) if a.json else format_patch(p))
    else:
        rec = model_record(a.file)
        if a.json:
            print(json.dumps(rec, indent=2))
        else:
            print("\n".join(f"{k:<13}{v}" for k, v in rec.items()))
    return 0
