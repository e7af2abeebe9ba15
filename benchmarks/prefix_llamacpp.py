"""Training's prefix pass through llama.cpp instead of torch: is it faster, and are the gradients the same?

    python benchmarks/prefix_llamacpp.py [--examples 200] [--model M.gguf] [--layer L]

Training (train/prefix.py) first runs one frozen torch forward per example to cache
the input of the patch's lowest block L at positions p0.. (``h``) and the K/V of
positions < p0 at blocks L..; for an ``l1`` patch that forward is most of a short
run.  Here the same token sequences (SST-2 train, as benchmarks/train_speed.py
encodes them) also go through llama.cpp's own CPU kernels, one example per
llama_decode with the KV cache cleared in between (no multi-sequence batching),
with the same thread count as torch; a Python eval callback copies out
``l_out-{L-1}`` (the input of block L).  The llama.cpp context keeps its KV cache
in F32 and runs without flash attention (the settings closest to torch's float32).

Compared: the captured rows against torch's cached ``h``, and, the decisive check,
one training step's LoReFT gradients (Trainer.batch_loss, backward) from torch's
cache vs from a cache whose ``h`` rows come from llama.cpp.  The K/V stay torch's
in both (reading llama.cpp's KV cache would be a further step).  The round-off
floor is torch against itself: the same examples' cache built one at a time
instead of in padded batches of 8.

Conclusion rule: build the llama.cpp prefix pass only if it is faster AND its
gradients equal torch's within float32 round-off (no further from them than the floor).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

from common import table


def llamacpp_pass(model, examples, layer: int, threads: int, capture: bool) -> tuple[list[np.ndarray], float]:
    """Each example through llama.cpp; the rows of l_out-{layer-1} per example (if ``capture``)."""
    from edge_reft.runtime.llamacpp import native as N
    name, d, got = f"l_out-{layer - 1}".encode(), model.n_embd, []

    def callback(t, ask, _user):
        if ask:
            return N.ggml_get_name(t) == name
        if N.ggml_get_name(t) == name:
            rows = np.empty((N.ggml_nelements(t) // d, d), np.float32)
            N.ggml_backend_tensor_get(t, rows.ctypes.data, 0, rows.nbytes)
            got.append(rows)
        return True
    cb = N.EvalCallback(callback) if capture else None
    n_ctx = -(-max(len(e.tokens) for e in examples) // 256) * 256
    ctx = N.Context(model, n_ctx=n_ctx, n_ubatch=n_ctx, n_threads=threads, flash_attn=False,
                    callback=cb, kv_f32=True)
    try:
        t0 = time.perf_counter()
        for e in examples:
            ctx.keep(0)
            ctx.decode(np.array(e.tokens, np.int32), 0, np.zeros(len(e.tokens), np.int8))  # no logits
        wall = time.perf_counter() - t0
    finally:
        ctx.close()
    if capture and [len(g) for g in got] != [len(e.tokens) for e in examples]:
        raise RuntimeError(f"captured {len(got)} tensors of {[len(g) for g in got][:5]}.. rows; expected one per example")
    return got, wall


def grads(trainer, cache, idx) -> tuple[list[torch.Tensor], float]:
    trainer.cache = cache
    trainer.reft.zero_grad(set_to_none=True)
    loss, n = trainer.batch_loss(idx)
    (loss / n).backward()
    return [p.grad.detach().clone() for p in trainer.reft.parameters()], float(loss.detach()) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--model", default=None, help="a GGUF (default: SmolLM2-135M Q4_1)")
    ap.add_argument("--layer", type=int, default=None, help="the patch's block (default: n_layer // 2)")
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds, in turn (the best of each is shown)")
    a = ap.parse_args()
    from edge_reft.dataset import encode
    from edge_reft.models import default_model
    from edge_reft.runtime import prompter_for
    from edge_reft.runtime.llamacpp import native as N
    from edge_reft.tasks import sst2_records
    from edge_reft.train import TrainConfig, Trainer, load_backbone
    from edge_reft.train import prefix
    from edge_reft.train.trainer import _weight_caches
    path = str(a.model or default_model())
    prompter, close = prompter_for(path)
    examples = encode([([{"role": "user", "content": r["prompt"]}], r["response"])
                       for r in sst2_records("train", a.examples)], prompter)
    close()
    bb = load_backbone(path)
    n_layer, threads = bb.model.config.get_text_config().num_hidden_layers, torch.get_num_threads()
    L = a.layer if a.layer is not None else n_layer // 2
    assert L >= 1, "block 0's input is the embedding, not an l_out"
    t = Trainer(bb.model, examples, TrainConfig(layers=(L,), rank=4, positions="l1", epochs=1, holdout=0),
                bb.base.n_embd)

    # ---- speed: torch's prefix.build (cold weights cache, as in training) and llama.cpp, in turn ----
    t0 = time.perf_counter()
    model = N.Model(path, n_gpu_layers=0)
    t_load = time.perf_counter() - t0
    times: dict[str, list[float]] = {"torch": [], "plain": [], "capture": []}
    for _ in range(a.rounds):
        for c in _weight_caches(bb.model):
            c.reset()
        t0 = time.perf_counter()
        cache = prefix.PrefixCache(4 << 30)
        prefix.build(bb.model, examples, L, t.reft.first_edited, cache, batch=t.config.batch_size)
        times["torch"].append(time.perf_counter() - t0)
        times["plain"].append(llamacpp_pass(model, examples, L, threads, capture=False)[1])
        rows, t_cap = llamacpp_pass(model, examples, L, threads, capture=True)
        times["capture"].append(t_cap)
        print(f"  round {len(times['torch'])}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()),
              file=sys.stderr, flush=True)
    model.close()
    t_torch, t_plain, t_cap = (min(v) for v in times.values())
    n = len(examples)
    print(table(["pass", "seconds", "examples/s", "speed vs torch"],
                [["torch prefix.build (batch 8, all blocks, K/V kept)", t_torch, n / t_torch, 1.0],
                 ["llama.cpp decode, no callback", t_plain, n / t_plain, t_torch / t_plain],
                 [f"llama.cpp decode + capture l_out-{L - 1} (Python callback)", t_cap, n / t_cap, t_torch / t_cap],
                 ["llama.cpp model load (once)", t_load, "-", "-"]],
                title=f"\nPrefix pass, {n} SST-2 train examples ({sum(len(e.tokens) for e in examples)} tokens), "
                      f"l1 patch at block {L} of {n_layer}, {os.path.basename(path)}, {threads} threads; "
                      f"best of {a.rounds} rounds"))

    # ---- the hidden states: llama.cpp's l_out-{L-1} rows p0.. against torch's h ----
    swapped = prefix.PrefixCache(4 << 30)
    for i, r in enumerate(rows):
        e = cache.get(i)
        swapped.put(i, prefix.Entry(e.p0, r[e.p0:].copy(), e.k, e.v))  # llama.cpp's h, torch's K/V

    # ---- one step's gradients (W moved off the identity start, so every parameter has one) ----
    idx = [int(i) for i in t.batches()[0]]
    floor, one = prefix.PrefixCache(1 << 30), prefix.PrefixCache(1 << 30)
    prefix.build(bb.model, [examples[i] for i in idx], L, t.reft.first_edited, one, batch=1)
    for j, i in enumerate(idx):
        floor.put(i, one.get(j))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for w in t.reft.W:
            w.add_(0.05 * torch.randn(w.shape, generator=gen))
    ref, loss_ref = grads(t, cache, idx)
    out, sci = [], lambda x: f"{x:.2e}"
    for label, other, ids in [("torch batch 1 vs torch batch 8 (round-off floor)", floor, idx),
                              ("llama.cpp h (torch K/V) vs torch", swapped, range(n))]:
        ab, rel = h_diff(other, cache, ids)
        g, loss = grads(t, other, idx)
        out.append([label, len(ids), *map(sci, (max(ab), float(np.median(ab)), max(rel))),
                    *[sci(float((x - y).norm() / y.norm())) for x, y in zip(g, ref)], sci(abs(loss - loss_ref)),
                    "yes" if all(torch.equal(x, y) for x, y in zip(g, ref)) else "no"])
    top = max(float(np.abs(cache.get(i).h).max()) for i in range(n))
    print(table(["comparison", "examples", "h max abs", "h median max abs", "h max row rel",
                 "grad rel A", "grad rel W", "grad rel b", "|loss diff|", "grads bit-equal"], out,
                title=f"\nDifferences (max |h| {top:.1f}; row rel = ||dh_row|| / ||h_row||, max over rows; "
                      f"gradients: one step, batch of {len(idx)}, loss {loss_ref:.4f}, "
                      f"grad rel = ||g - g_torch|| / ||g_torch||)"))


def h_diff(a, b, ids) -> tuple[list[float], list[float]]:
    """Per example: max |a.h - b.h| and the largest row-relative difference."""
    ab, rel = [], []
    for i in ids:
        x, y = a.get(i).h, b.get(i).h
        ab.append(float(np.abs(x - y).max()))
        rel.append(float((np.linalg.norm(x - y, axis=1) / np.linalg.norm(y, axis=1)).max()))
    return ab, rel


if __name__ == "__main__":
    sys.exit(main())
