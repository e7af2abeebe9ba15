"""The backend table: one row per backend, naming what it opens, where its engine lives and
the options the command line offers for it.

``Engine``, ``edge-reft run``, ``serve`` and ``eval`` (and the server) choose a
backend and build their flags from this table, so adding a backend is one
folder under runtime/ and one row here.  Nothing here imports a backend's
library: a row names its engine as "module:Class", imported when a model is
opened.
"""
from __future__ import annotations

import argparse
import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from edge_reft.errors import ReftError

ON_OFF_AUTO = {"auto": None, "on": True, "off": False}


@dataclass(frozen=True)
class Option:
    """A backend's command-line option: ``flag`` sets the engine's keyword ``keyword``."""
    flag: str
    keyword: str
    help: str
    type: Callable[[str], Any] = str
    choices: tuple[str, ...] | None = None
    values: dict[str, Any] | None = None    # a choice -> the engine's value


@dataclass(frozen=True)
class Backend:
    name: str
    engine: str                             # "module:Class", imported when a model is opened
    opens: str                              # what it opens, in words (messages, --help)
    folder: bool                            # it opens a folder (else a file)
    options: tuple[Option, ...] = ()
    aliases: tuple[str, ...] = field(default=())
    slots: int = 1                          # sequences one engine decodes together by default (serve)

    def engine_class(self) -> type:
        module, cls = self.engine.split(":")
        return getattr(importlib.import_module(module), cls)


BACKENDS = (
    Backend("llama.cpp", "edge_reft.runtime.llamacpp.engine:LlamaCppEngine", "a .gguf file", folder=False,
            aliases=("llamacpp",), slots=8, options=(
                Option("--ngl", "n_gpu_layers", "layers offloaded to the GPU", type=int),
                Option("--repack", "repack", "CPU weight repacking (default: $EDGE_REFT_REPACK, else "
                       "auto: off where llama.cpp offers AMX, whose repacked matmul crashes in the "
                       "pinned build)", choices=("auto", "on", "off")),
                Option("--split-decode", "split_decode", "decode tokens a patch does not edit in a "
                       "second context without the eval callback (auto: when --ngl > 0; costs a "
                       "second KV cache)", choices=tuple(ON_OFF_AUTO), values=ON_OFF_AUTO),
                Option("--kv-f32", "kv_f32", "keep the KV cache in float32 instead of float16 (twice the "
                       "memory; for comparing with a float32 reference such as pyreft's)",
                       choices=("on", "off"), values={"on": True, "off": False}),
                Option("--kv-unified", "kv_unified", "serve --slots: one KV stream for all slots (every "
                       "step one ubatch) instead of one per slot (default off: on a CPU each answer is "
                       "then bit for bit what it is alone, whatever the batch)",
                       choices=("on", "off"), values={"on": True, "off": False}),
            )),
    Backend("onnx", "edge_reft.runtime.onnx.engine:OnnxEngine",
            "a folder made by `edge-reft export-onnx`", folder=True, options=(
                Option("--providers", "providers", "onnxruntime execution providers, comma-separated "
                       "(default: CPUExecutionProvider)", type=lambda s: tuple(filter(None, s.split(",")))),
            )),
)
NAMES = tuple(b.name for b in BACKENDS)


def backend_named(name: str) -> Backend:
    for b in BACKENDS:
        if name == b.name or name in b.aliases:
            return b
    raise ReftError(f"backend: {name!r}, expected one of {NAMES}")


def backend_for(model: str | os.PathLike[str], name: str | None = None) -> Backend:
    """The backend ``name``, or the one that opens what ``model`` is (a file or a folder)."""
    if name is not None:
        return backend_named(name)
    is_dir = os.path.isdir(model)
    return next(b for b in BACKENDS if b.folder == is_dir)


def open_engine(model: str | os.PathLike[str], backend: str | None = None, **options: Any):
    """An engine for ``model`` (see ``backend_for``) with the engine's keyword ``options``."""
    if model is None:
        raise ReftError("model: none given; expected one of: "
                        + "; ".join(f"{b.opens} ({b.name})" for b in BACKENDS))
    return backend_for(model, backend).engine_class()(model, **options)


def add_options(ap: argparse.ArgumentParser) -> None:
    """``--backend`` and every backend's options, grouped by backend (defaults: the engine's)."""
    ap.add_argument("--backend", choices=NAMES, default=None,
                    help="default: llama.cpp for a file, onnx for a folder")
    for b in BACKENDS:
        group = ap.add_argument_group(f"{b.name} backend")
        for o in b.options:
            group.add_argument(o.flag, dest=_dest(o), type=o.type, choices=o.choices, default=None,
                               help=o.help, metavar=None if o.choices else o.flag.lstrip("-").upper())


def engine_options(args: argparse.Namespace, backend: Backend) -> dict[str, Any]:
    """The engine keywords of ``backend``'s options given in ``args``; an option of another
    backend that was given is refused by name."""
    out, foreign = {}, []
    for b in BACKENDS:
        for o in b.options:
            value = getattr(args, _dest(o), None)
            if value is None:
                continue
            if b is backend:
                out[o.keyword] = o.values[value] if o.values else value
            elif not any(o.flag == mine.flag for mine in backend.options):
                foreign.append(f"{o.flag} (a {b.name} option)")
    if foreign:
        raise ReftError(f"{', '.join(foreign)}: the {backend.name} backend has no such option "
                        f"(it opens {backend.opens})")
    return out


def _dest(o: Option) -> str:
    return "backend_" + o.flag.lstrip("-").replace("-", "_")
