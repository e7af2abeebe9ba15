"""Read and write `.reft` files (the format is ``spec``; prose in FORMAT.md).

``load_patch`` validates everything before anything runs and reports every
problem at once; ``save_patch`` writes through gguf-py's own writer (so
llama.cpp's tools list the file) through ``files.atomic_path``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from . import ggufscan as gs
from . import interventions as types
from . import spec
from .errors import ReftFormatError
from .files import atomic_path
from .patch import BaseModel, Intervention, Patch, base_problems, intervention_problems
from .positions import PositionRule

REFT_LIMITS = gs.Limits(
    max_key_bytes=spec.MAX_KEY_BYTES, max_string_bytes=spec.MAX_STRING_BYTES,
    max_array_depth=1, max_kv=spec.MAX_KV, max_tensors=3 * spec.MAX_INTERVENTIONS,
    tensor_types=spec.DTYPE_BLOCKS, strict_utf8=True,
    max_trailing_bytes=spec.GGUF_DEFAULT_ALIGNMENT - 1)


def decode_tensor(raw: bytes | memoryview, ggml_type: int, shape: tuple[int, ...]) -> np.ndarray:
    """F32 / F16 / BF16 little-endian bytes to a float32 array of ``shape``."""
    if ggml_type == spec.GGML_F32:
        a = np.frombuffer(raw, dtype="<f4")
    elif ggml_type == spec.GGML_F16:
        a = np.frombuffer(raw, dtype="<f2")
    else:  # BF16: the high half of a float32
        a = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32).reshape(shape)


def encode_bf16(a: np.ndarray) -> np.ndarray:
    """float32 to bfloat16 bits (uint16), rounding to nearest even."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def _typed(fields: Any, name: str, want: str, problems: list[str], required: bool = True) -> Any:
    v = fields.get(name)
    if v is None:
        if required:
            problems.append(f"{name}: missing (expected {want})")
        return None
    if v.type_name != want:
        problems.append(f"{name}: type {v.type_name}, expected {want}")
        return None
    return v.value


def load_patch(path: str | os.PathLike[str], *, model: BaseModel | None = None,
               allow_mismatch: bool = False, max_bytes: int | None = spec.DEFAULT_MAX_BYTES) -> Patch:
    """Read and fully validate a `.reft` file; check it against ``model`` when given."""
    p = os.fspath(path)
    data = gs.read_bytes(p, max_bytes)
    g = gs.parse(data, p, REFT_LIMITS)
    problems: list[str] = []
    f = g.fields
    if g.version != spec.GGUF_VERSION:
        problems.append(f"header version: {g.version}, expected {spec.GGUF_VERSION}")
    vals = {k: _typed(f, k, t, problems) for k, t in spec.REQUIRED_FIELDS.items()}
    opt = {k: _typed(f, k, t, problems, required=False) for k, t in spec.OPTIONAL_FIELDS.items()}
    for k, want in ((spec.GENERAL_TYPE, spec.GENERAL_TYPE_VALUE), (spec.ADAPTER_TYPE, spec.ADAPTER_TYPE_VALUE)):
        if vals[k] is not None and vals[k] != want:
            problems.append(f"{k}: {vals[k]!r}, expected {want!r}")
    version = vals[spec.REFT_VERSION_KEY]
    if version is not None and version not in spec.READ_VERSIONS:
        newer = " (a newer edge-reft wrote it: upgrade to read it)" if version > spec.REFT_VERSION else ""
        problems.append(f"{spec.REFT_VERSION_KEY}: {version}, expected one of "
                        f"{', '.join(map(str, spec.READ_VERSIONS))}{newer}")
    n_embd, n_layer, count = vals[spec.BASE_N_EMBD], vals[spec.BASE_N_LAYER], vals[spec.COUNT]
    fp = vals[spec.BASE_FINGERPRINT]
    if None not in (n_embd, n_layer, fp, vals[spec.GENERAL_ARCHITECTURE]):
        base = BaseModel(vals[spec.GENERAL_ARCHITECTURE], n_embd, n_layer, fp, vals[spec.BASE_NAME] or "")
        problems += base_problems(base)
    if count is not None and not 1 <= count <= spec.MAX_INTERVENTIONS:
        problems.append(f"{spec.COUNT}: {count}, expected 1..{spec.MAX_INTERVENTIONS}")
        count = None
    if problems or None in (n_embd, n_layer, count):
        raise ReftFormatError(p, problems)

    tensors = {t.name: t for t in g.tensors}
    metas = [{fld: _typed(f, spec.key(i, fld), t, problems) for fld, t in spec.INTERVENTION_FIELDS.items()}
             for i in range(count)]
    # the tensors each intervention's type stores (all three where the type is unknown or missing)
    roles = [(types.get(m[spec.TYPE]) or types.TYPES["loreft"]).stored for m in metas]
    expected = {spec.tensor_name(i, r) for i in range(count) for r in roles[i]}
    for extra in sorted(set(tensors) - expected):
        problems.append(f"tensor {extra!r}: unexpected ({_why_unexpected(extra, metas, count)})")
    known = set(spec.REQUIRED_FIELDS) | set(spec.OPTIONAL_FIELDS)
    known |= {spec.key(i, fld) for i in range(count) for fld in spec.INTERVENTION_FIELDS}
    for k in f:
        if k not in known and not k.startswith(spec.TRAIN_PREFIX) and k.startswith("reft."):
            problems.append(f"{k}: unexpected key (reft.count is {count})")

    interventions = []
    for i, meta in enumerate(metas):
        arrays, rdtype = {}, spec.GGML_F32
        for role in roles[i]:
            t = tensors.get(spec.tensor_name(i, role))
            if t is None:
                problems.append(f"tensor {spec.tensor_name(i, role)!r}: missing")
                continue
            arrays[role] = decode_tensor(memoryview(data)[t.offset:t.offset + t.nbytes], t.ggml_type, t.shape)
            if role == spec.ROTATE:
                rdtype = t.ggml_type
        if None in meta.values():
            continue
        found = intervention_problems(
            f"reft.{i}", type=meta[spec.TYPE], layer=meta[spec.LAYER], component=meta[spec.COMPONENT],
            positions=meta[spec.POSITIONS], rank=meta[spec.RANK], n_embd=n_embd, n_layer=n_layer,
            rotate=arrays.get(spec.ROTATE), weight=arrays.get(spec.WEIGHT), bias=arrays.get(spec.BIAS),
            rotate_dtype=rdtype, version=version)
        problems += found
        if not found and len(arrays) == len(roles[i]):
            interventions.append(Intervention(
                meta[spec.LAYER], PositionRule.parse(meta[spec.POSITIONS]), arrays[spec.ROTATE],
                arrays.get(spec.WEIGHT), arrays[spec.BIAS], meta[spec.TYPE], meta[spec.COMPONENT], rdtype))
    if problems:
        raise ReftFormatError(p, problems)

    provenance = {k[len(spec.TRAIN_PREFIX):]: _plain(v.value) for k, v in f.items()
                  if k.startswith(spec.TRAIN_PREFIX)}
    patch = Patch(base, tuple(interventions), opt[spec.GENERAL_NAME] or "",
                  opt[spec.GENERAL_DESCRIPTION] or "", provenance, source=p)
    if model is not None:
        patch.check_base(model, allow_mismatch)
    return patch


def _why_unexpected(name: str, metas: list[dict[str, Any]], count: int) -> str:
    """Why a tensor is not one the file should hold: past reft.count, or a role its type lacks."""
    parts = name.split(".")
    if len(parts) == 3 and parts[0] == "reft" and parts[1].isdigit() and int(parts[1]) < count:
        itype = types.get(metas[int(parts[1])][spec.TYPE])
        if itype is not None and parts[2] in types.ROLES:
            return f"a {itype.name} intervention stores {', '.join(itype.stored)}: {itype.formula}"
    return f"reft.count is {count}"


def _plain(v: Any) -> Any:
    return v.tolist() if isinstance(v, np.ndarray) else list(v) if isinstance(v, tuple) else v


def save_patch(patch: Patch, path: str | os.PathLike[str]) -> Path:
    """Write ``patch`` atomically (temp file, fsync, rename); return the path."""
    import gguf  # the writer only: reading never needs gguf-py

    out = Path(path)
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(tmp, patch.base.architecture)
        kv = w.add_key_value
        S, U32 = gguf.GGUFValueType.STRING, gguf.GGUFValueType.UINT32
        kv(spec.GENERAL_TYPE, spec.GENERAL_TYPE_VALUE, S)
        kv(spec.ADAPTER_TYPE, spec.ADAPTER_TYPE_VALUE, S)
        kv(spec.REFT_VERSION_KEY, patch.version, U32)
        for k, v in ((spec.GENERAL_NAME, patch.name), (spec.GENERAL_DESCRIPTION, patch.description)):
            if v:
                kv(k, v, S)
        kv(spec.BASE_N_EMBD, patch.base.n_embd, U32)
        kv(spec.BASE_N_LAYER, patch.base.n_layer, U32)
        kv(spec.BASE_FINGERPRINT, patch.base.fingerprint, S)
        kv(spec.BASE_NAME, patch.base.name, S)
        kv(spec.COUNT, len(patch.interventions), U32)
        for i, iv in enumerate(patch.interventions):
            kv(spec.key(i, spec.TYPE), iv.type, S)
            kv(spec.key(i, spec.LAYER), iv.layer, U32)
            kv(spec.key(i, spec.COMPONENT), iv.component, S)
            kv(spec.key(i, spec.POSITIONS), str(iv.positions), S)
            kv(spec.key(i, spec.RANK), iv.rank, U32)
        for k, v in patch.provenance.items():
            _add_provenance(w, gguf, spec.TRAIN_PREFIX + k, v)
        for i, iv in enumerate(patch.interventions):
            for role, a in iv.arrays.items():
                if iv.dtype == spec.GGML_BF16:
                    w.add_tensor(spec.tensor_name(i, role), encode_bf16(a),
                                 raw_dtype=gguf.GGMLQuantizationType.BF16)
                else:
                    w.add_tensor(spec.tensor_name(i, role),
                                 a.astype(np.float16 if iv.dtype == spec.GGML_F16 else np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out


def _add_provenance(w: Any, gguf: Any, k: str, v: Any) -> None:
    T = gguf.GGUFValueType
    if isinstance(v, bool):
        w.add_key_value(k, v, T.BOOL)
    elif isinstance(v, int):
        w.add_key_value(k, v, T.INT64)
    elif isinstance(v, float):
        w.add_key_value(k, v, T.FLOAT64)
    elif isinstance(v, str):
        w.add_key_value(k, v, T.STRING)
    else:
        sub = {bool: T.BOOL, int: T.INT64, float: T.FLOAT64, str: T.STRING}[type(v[0])]
        w.add_key_value(k, list(v), T.ARRAY, sub_type=sub)

