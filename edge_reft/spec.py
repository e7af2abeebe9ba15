"""The `.reft` file format: every key, type, tensor name and limit, in one place.

A `.reft` file is a GGUF v3 file (so llama.cpp's gguf tools can list it).
The writer (`reftfile.save_patch`) and the reader (`reftfile.load_patch`)
both import this module; nothing else defines a key.  FORMAT.md (project
root) explains the format in prose.

Keys are a contract: add, never rename.
"""
from __future__ import annotations

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
GGUF_DEFAULT_ALIGNMENT = 32
REFT_VERSION = 2                  # the newest version; a writer writes the lowest that holds a patch
READ_VERSIONS = (1, 2)            # version 1 files are read unchanged

# ---- metadata keys ---------------------------------------------------------
GENERAL_TYPE = "general.type"                 # str: "adapter"
GENERAL_ARCHITECTURE = "general.architecture"  # str: base architecture ("llama", "gemma3")
GENERAL_NAME = "general.name"                  # str, optional
GENERAL_DESCRIPTION = "general.description"    # str, optional
GENERAL_ALIGNMENT = "general.alignment"        # u32, optional (GGUF)
ADAPTER_TYPE = "adapter.type"                  # str: "reft"
REFT_VERSION_KEY = "reft.version"              # u32: one of READ_VERSIONS
BASE_N_EMBD = "reft.base.n_embd"               # u32
BASE_N_LAYER = "reft.base.n_layer"             # u32
BASE_FINGERPRINT = "reft.base.fingerprint"     # str: 64 hex digits
BASE_NAME = "reft.base.name"                   # str: human hint
COUNT = "reft.count"                           # u32: number of interventions
TRAIN_PREFIX = "reft.train."                   # provenance: str / u32 / f32 / ... scalars

GENERAL_TYPE_VALUE = "adapter"
ADAPTER_TYPE_VALUE = "reft"


def key(i: int, field: str) -> str:
    """Metadata key of intervention ``i``: ``reft.{i}.{field}``."""
    return f"reft.{i}.{field}"


# per-intervention fields: name -> GGUF value type name
TYPE, LAYER, COMPONENT, POSITIONS, RANK = "type", "layer", "component", "positions", "rank"
INTERVENTION_FIELDS = {TYPE: "STRING", LAYER: "UINT32", COMPONENT: "STRING",
                       POSITIONS: "STRING", RANK: "UINT32"}

# top-level fields that must be present, with their GGUF value type name
REQUIRED_FIELDS = {
    GENERAL_TYPE: "STRING", GENERAL_ARCHITECTURE: "STRING", ADAPTER_TYPE: "STRING",
    REFT_VERSION_KEY: "UINT32", BASE_N_EMBD: "UINT32", BASE_N_LAYER: "UINT32",
    BASE_FINGERPRINT: "STRING", BASE_NAME: "STRING", COUNT: "UINT32",
}
OPTIONAL_FIELDS = {GENERAL_NAME: "STRING", GENERAL_DESCRIPTION: "STRING",
                   GENERAL_ALIGNMENT: "UINT32"}


# ---- tensors ---------------------------------------------------------------
ROTATE, WEIGHT, BIAS = "rotate", "weight", "bias"


def tensor_name(i: int, role: str) -> str:
    """Tensor name of intervention ``i``: ``reft.{i}.rotate|weight|bias``."""
    return f"reft.{i}.{role}"


# intervention types (reft.{i}.type): the table is edge_reft/interventions.py, their math with it
COMPONENTS = ("block_output",)

# GGML tensor types a patch may store; everything is computed in float32.
GGML_F32, GGML_F16, GGML_BF16 = 0, 1, 30
TENSOR_DTYPES = {GGML_F32: "F32", GGML_F16: "F16", GGML_BF16: "BF16"}
DTYPE_BYTES = {GGML_F32: 4, GGML_F16: 2, GGML_BF16: 2}
DTYPE_BLOCKS = {t: (1, n) for t, n in DTYPE_BYTES.items()}  # (elements, bytes) per block
# unit roundoff of each storage type
UNIT_ROUNDOFF = {GGML_F32: 2.0 ** -24, GGML_F16: 2.0 ** -11, GGML_BF16: 2.0 ** -8}


def orthonormal_tolerance(ggml_type: int) -> float:
    """Largest |R R^T - I| entry accepted for R stored as ``ggml_type``.

    Rounding each entry of an exactly orthonormal R to a type of unit
    roundoff u moves every entry of R R^T by at most 2u; we accept 4u plus
    1e-4 for the float32 training/export error: F32 1.0e-4, F16 2.05e-3,
    BF16 1.57e-2.
    """
    return 1e-4 + 4.0 * UNIT_ROUNDOFF[ggml_type]


# ---- limits ------------------------------------------------------------------
DEFAULT_MAX_BYTES = 16 * 1024 * 1024   # a patch is kilobytes; refuse more unless asked
MAX_INTERVENTIONS = 1024
MAX_RANK = 4096
MAX_KEY_BYTES = 256
MAX_STRING_BYTES = 64 * 1024           # any single string value in a patch
# largest |value| of R, W or b.  Trained patches hold values of order 1 (R is orthonormal, so
# |R| <= 1; W and b stay below ~10); 1e4 leaves three orders of magnitude for that while
# refusing files whose edit is noise: with |W| = 1e30 the term W h overflows float16 backends
# (max 65504) and swamps float32 hidden states, and nothing useful can be that large.
MAX_ABS_VALUE = 1e4
MAX_KV = 64 + 8 * MAX_INTERVENTIONS
PATCH_SUFFIX = ".reft"
# a patch's name (a served or pulled patch is NAME.reft): no separators, no leading dot, no "..";
# \A..\Z, not ^..$: "$" also matches before a trailing newline, and "evil\n" is not a name
PATCH_NAME = r"\A(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}\Z"
