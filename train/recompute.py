"""Keep only each block's input during a training step; recompute the block in backward.

A step runs every block from the patch's lowest one with gradients, and torch
keeps what each op needs for backward: ~60 floats per token per unit of width
for a Llama block (q, k, v, attention, norms, the MLP's gate, up and their
product).  For a 3 B model that is ~250 KB per token per block, 2 GB for a
batch of 8 short examples through 24 blocks: more than the model's 4-bit
weights.  With recompute on, a block keeps only its input (4 bytes x width per
token) and runs a second time during backward, one block at a time: the
memory of one block's activations instead of all of them, for ~1/3 more compute
in the trained blocks.  Gradients are the same bit for bit (the recomputed ops
are the very same ops on the same inputs).

transformers' own gradient checkpointing cannot do this here: it turns itself
off in eval mode (the backbone is frozen, so it stays in eval) and drops the
KV cache that holds the prefix's keys and values (``prefix.cached_forward``).
``Recomputed`` keeps the cache: before the block runs (and again before its
recompute), the cache's layers are put back as they were, so the block appends
its keys and values to the same prefix both times.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch.utils.checkpoint import checkpoint

# Estimated activations above this turn recompute on (CPU, MPS).  The estimate is an upper bound
# (a Llama-3.2-1B shape's 0.99 GiB estimate measured ~0.6 GiB); 512 MiB keeps `edge-reft train`
# within its goal of file size + 1.5 GiB on a 16-thread CPU, where 1 GiB did not (1.58 GiB over).
AUTO_BUDGET = 512 << 20
FLOATS_PER_TOKEN = (12, 5)  # kept floats per token per block: 12 x width + 5 x MLP width (an upper bound)


def activation_bytes(cfg: Any, n_blocks: int, tokens: int) -> int:
    """An upper bound on what backward keeps for ``tokens`` through ``n_blocks`` blocks."""
    a, b = FLOATS_PER_TOKEN
    return 4 * tokens * n_blocks * (a * cfg.hidden_size + b * cfg.intermediate_size)


def auto_recompute(model: Any, first_layer: int, lengths: Sequence[int], batch_size: int) -> bool:
    """On when the largest batch's activations (the ``batch_size`` longest of ``lengths``, the
    positions each example runs through the trained blocks) would pass AUTO_BUDGET, or half the
    free memory of a CUDA device."""
    from .prefix import room
    cfg = model.config.get_text_config()
    tokens = sum(sorted(lengths, reverse=True)[:batch_size])
    return activation_bytes(cfg, cfg.num_hidden_layers - first_layer, tokens) > room(model, AUTO_BUDGET)


class Recomputed(torch.nn.Module):
    """A decoder block that keeps only its input for backward (see the module's doc)."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.block = block

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:  # attributes the decoder loop reads from its blocks (attention_type, ...)
            return getattr(super().__getattr__("block"), name)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.block(hidden_states, *args, **kwargs)
        past = kwargs.get("past_key_values")
        saved = [dict(layer.__dict__) for layer in past.layers] if past is not None else []

        def run(h: torch.Tensor) -> Any:
            for layer, state in zip(past.layers if past is not None else (), saved):
                layer.__dict__.update(state)
            return self.block(h, *args, **kwargs)

        return checkpoint(run, hidden_states, use_reentrant=False)


@contextmanager
def recomputed(layers: torch.nn.ModuleList, first: int, on: bool = True) -> Iterator[None]:
    """Blocks ``first``.. recompute in backward while inside (nothing changes when ``on`` is
    False).  Enter before hooks are put on the blocks, so that they stay outside the
    recompute: an edit runs once, on the recomputed block's output."""
    if not on:
        yield
        return
    kept = {L: layers[L] for L in range(first, len(layers))}
    for L, block in kept.items():
        layers[L] = Recomputed(block)
    try:
        yield
    finally:
        for L, block in kept.items():
            layers[L] = block
