"""edge-reft: personalize a quantized LLM with a LoReFT patch of a few kilobytes.

    import edge_reft
    patch = edge_reft.load_patch("user.reft")
    engine = edge_reft.Engine("model.gguf")          # llama.cpp backend
    for piece in engine.generate("Hello", patch=patch):
        print(piece, end="")

Importing this package never imports torch: the runtime runs on machines
that have none.

This folder is layer 0, the core: the ``.reft`` format (``spec``, ``reftfile``,
``ggufscan``, ``fingerprint``), the math (``loreft``, ``positions``, ``patch``), prompts and
tokens (``chat``, ``hftokenizer``, ``dataset``), files and errors.  The layers above it:
runtime/ (1, generating backends), train/ (2), converters/ (3), services/ (4: CLI,
server, evaluation).  Each package's docstring names what it may import; tests/test_layers.py
checks every import against it.  The core imports nothing above it; only this file's
``Engine`` (and ``__main__``) open the layers above, lazily.

Imports: -
"""
from __future__ import annotations

import os
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


def Engine(model: str | os.PathLike[str] | None = None, backend: str | None = None, **options: Any):
    """``edge_reft.runtime.Engine`` for ``model``; without one, the embedded SmolLM2-135M."""
    from .models import default_model
    from .runtime import Engine as open_engine  # the runtime loads llama.cpp: paid for when used
    return open_engine(default_model() if model is None else model, backend, **options)
