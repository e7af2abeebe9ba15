"""Keep the first K blocks of a GGUF model (quantized tensors copied as they are).

    python benchmarks/gpu/cut_model.py IN.gguf OUT.gguf K

The device tool carries at most 64 MiB per call: SmolLM2-135M Q4_1 cut to 12
of its 30 blocks is ~44 MB and keeps every shape of the full model.  The
fingerprint changes (n_layer is part of it), which the GPU run accounts for.
"""
from __future__ import annotations

import re
import sys

import gguf


def cut(src: str, dst: str, keep: int) -> None:
    r = gguf.GGUFReader(src)
    arch = r.get_field("general.architecture").contents()
    w = gguf.GGUFWriter(dst, arch)
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name in ("general.architecture", "general.alignment"):
            continue
        value = keep if f.name == f"{arch}.block_count" else f.contents()
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(f.name, value, f.types[0], sub_type=sub)
    for t in r.tensors:
        m = re.match(r"blk\.(\d+)\.", t.name)
        if m and int(m.group(1)) >= keep:
            continue
        # quantized data comes as uint8 rows (the writer derives the shape); F32/F16 as is
        w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type if t.data.dtype.kind == "u" else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    cut(sys.argv[1], sys.argv[2], int(sys.argv[3]))
