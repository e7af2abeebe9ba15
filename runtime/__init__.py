"""Layer 1, the generating backends: apply patches while generating, with llama.cpp or
ONNX Runtime.

Imports: edge_reft

    Engine(model)                      # a .gguf file: llama.cpp
    Engine(onnx_dir, backend="onnx")   # a folder from `edge-reft export-onnx`
    Engine(model, slots=8).generate_many([{"prompt": ..., "patch": ...}, ...])  # batched

Shared by every backend (this folder): ``engine`` (the one generate loop, the KV-cache
rule, patch binding), ``batching`` (many requests, each with its own patches, decoded
together), ``edits`` (patches compiled for a runtime), ``sampling``,
``textstream``, ``kvstates``, and ``backends``, the table that names each backend.
One folder per backend, the same files in each: ``engine.py`` (its ``EngineBase``
subclass: the four primitives) and ``native.py`` (the thin layer over its library).
This package never imports a backend folder by name; the table imports one when a
model is opened.  Nothing here imports torch.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge_reft.chat import Prompter

    from .engine import EngineBase

# Names served lazily: the CLI imports ``backends`` to build its flags, and must not pay
# for numpy and the generate loop before it parses them.
_HOMES = {"BACKENDS": "backends", "NAMES": "backends", "PatchSet": "edits",
          "Completion": "engine", "EngineBase": "engine", "Generation": "engine"}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        import importlib
        return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def Engine(model: str | os.PathLike[str], backend: str | None = None, **options: Any) -> EngineBase:
    """Open ``model`` with a backend: "llama.cpp" (a .gguf; the default for a file) or "onnx"
    (a folder made by ``edge-reft export-onnx``); ``options`` are the engine's keywords."""
    from .backends import open_engine
    return open_engine(model, backend, **options)


def prompter_for(base: str | os.PathLike[str]) -> tuple[Prompter, Any]:
    """The Prompter of a base model, with the tokenizer the runtime uses for it (llama.cpp's
    for a GGUF file; the folder's tokenizer.json otherwise), and a closer for native resources."""
    from .backends import backend_for
    row = backend_for(base)
    if row.folder:
        from edge_reft.hftokenizer import HFTokenizer
        return HFTokenizer(base).prompter(), (lambda: None)
    return row.engine_class().vocab_prompter(base)


__all__ = ["Engine", "EngineBase", "Completion", "Generation", "PatchSet", "BACKENDS", "NAMES",
           "prompter_for"]
