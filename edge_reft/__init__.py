"""edge-reft: personalize a quantized LLM with a LoReFT patch of a few kilobytes.

    import edge_reft
    patch = edge_reft.load_patch("user.reft")
    engine = edge_reft.Engine("model.gguf")          # llama.cpp backend
    for piece in engine.generate("Hello", patch=patch):
        print(piece, end="")

Importing this package never imports torch: the runtime runs on machines
that have none.
"""
from __future__ import annotations

from typing import Any

from .errors import BackendError, PatchMismatchError, PositionError, ReftError, ReftFormatError
from .fingerprint import base_model
from .patch import BaseModel, Intervention, Patch
from .positions import PositionRule
from .reftfile import load_patch, save_patch

__version__ = "0.1.0"
__all__ = ["BaseModel", "Intervention", "Patch", "PositionRule", "load_patch", "save_patch",
           "base_model", "Engine", "ReftError", "ReftFormatError", "PatchMismatchError",
           "PositionError", "BackendError", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Engine":  # the runtime loads llama.cpp; only pay for it when used
        from .runtime import Engine
        return Engine
    raise AttributeError(f"module 'edge_reft' has no attribute {name!r}")
