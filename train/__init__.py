"""Layer 2, training: a patch trained on a 4-bit backbone with PyTorch.

Imports: edge_reft, edge_reft.runtime

    from edge_reft.train import TrainConfig, train
    train("model.gguf", "data.jsonl", "user.reft", TrainConfig(layers=(4, 10), positions="f1+l1"))

``entry`` (``train()``: check, train, checkpoint, write), ``trainer`` (the loop),
``interventions`` and ``loreft_torch`` (the math in torch, checked against
edge_reft.loreft), ``backbone`` / ``ggufq`` / ``kquants`` (the user's GGUF blocks as torch
modules, or bitsandbytes NF4), ``prefix`` (cached frozen prefixes), ``hf`` (the torch
reference model).  It uses the runtime for one thing: the tokenizer, so a patch is trained
on the tokens it is served with.  Importing this package imports nothing heavy; torch
comes with the first name used.
"""
from __future__ import annotations

import importlib
from typing import Any

_HOMES = {"train": "entry", "TrainConfig": "trainer", "Trainer": "trainer", "DEFAULT_LR": "trainer",
          "load_backbone": "backbone", "Backbone": "backbone"}
__all__ = list(_HOMES)


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
