"""Backends that apply patches while generating: llama.cpp and ONNX Runtime.

    Engine(model)                      # a .gguf file: llama.cpp
    Engine(onnx_dir, backend="onnx")   # a folder from `edge-reft export-onnx`

Both share ``EngineBase``: the same ``generate``/``logits`` semantics, chat
template, position rules, KV-cache rule and sampling.
"""
from __future__ import annotations

import os
from typing import Any

from .engine import Completion, EngineBase, Generation
from .edits import PatchSet

BACKENDS = ("llama.cpp", "onnx")


def Engine(model: str | os.PathLike[str] | None = None, backend: str | None = None, **options: Any) -> EngineBase:
    """Open ``model`` with a backend: "llama.cpp" (a .gguf; the default) or "onnx" (a folder)."""
    if backend is None:
        backend = "onnx" if model is not None and os.path.isdir(model) else "llama.cpp"
    if backend in ("llama.cpp", "llamacpp"):
        from .llamacpp import LlamaCppEngine
        return LlamaCppEngine(model, **options)
    if backend == "onnx":
        from .onnx_backend import OnnxEngine
        return OnnxEngine(model, **options)
    from edge_reft.errors import ReftError
    raise ReftError(f"backend: {backend!r}, expected one of {BACKENDS}")


__all__ = ["Engine", "EngineBase", "Completion", "Generation", "PatchSet", "BACKENDS"]
