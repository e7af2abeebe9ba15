"""Rewrite a quantized model GGUF with float32 (or F16) tensors, same metadata.

The result holds exactly the weights llama.cpp computes with when it
dequantizes the original, so llama.cpp on it and PyTorch on the same weights
can be compared to float32 rounding.  Used by parity tests and benchmarks.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .files import atomic_path


def dequantize_gguf(src: str | os.PathLike[str], dst: str | os.PathLike[str], dtype: str = "F32") -> Path:
    """Write ``dst``: ``src`` with every quantized tensor dequantized to ``dtype`` (F32 or F16)."""
    import gguf
    from gguf import GGMLQuantizationType as Q, GGUFValueType as T

    reader = gguf.GGUFReader(os.fspath(src))  # a trusted model file (patches never go through this)
    arch = reader.get_field("general.architecture").contents()
    out = Path(dst)
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(tmp, arch)
        for field in reader.fields.values():
            if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.alignment"):
                continue
            value = field.contents()
            if field.name == "general.file_type":
                value = 0 if dtype == "F32" else 1
            sub = field.types[-1] if field.types[0] == T.ARRAY else None
            w.add_key_value(field.name, value, field.types[0], sub_type=sub)
        for t in reader.tensors:
            data = gguf.quants.dequantize(t.data, t.tensor_type)
            shape = tuple(int(x) for x in reversed(t.shape))
            data = np.asarray(data, dtype=np.float32).reshape(shape)
            if dtype == "F16" and t.tensor_type not in (Q.F32,):
                data = data.astype(np.float16)
            w.add_tensor(t.name, data)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out
