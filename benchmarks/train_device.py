"""Training throughput and peak device memory on a GPU (or any device torch sees).

    python benchmarks/train_device.py --model M.gguf [--device cuda] [--examples 500] [--tokens 128]

Examples are real text (this repository's README.md and FORMAT.md) tokenized
by the model's own tokenizer, in windows of exactly ``--tokens`` tokens (the
last 8 the reply), so every recipe sees the same work.  For each recipe the backbone is
loaded on the device (the GGUF's own blocks, dequantized there), the prefix
cache built (timed), then one epoch of steps (timed after a warm-up step);
examples/s counts the epoch's examples over prefix + steps.  Peak memory is
``torch.cuda.max_memory_allocated`` (the device's own allocator).  With random
weights (tests/shapes.py) only the speed and memory mean anything.
"""
from __future__ import annotations

import argparse
import sys
import time

from common import ROOT, table

RECIPES = {"l1 at 1 block": dict(positions="l1", layers="mid"),
           "f1+l1 at 4 blocks": dict(positions="f1+l1", layers=None)}


def examples(model: str, n: int, tokens: int) -> list:
    """``n`` windows of ``tokens`` tokens over real text (this repository's README and
    FORMAT.md, which travel with it), the last 8 tokens of each the reply."""
    from edge_reft.dataset import Example
    from edge_reft.runtime import Engine
    text = "\n\n".join((ROOT / f).read_text() for f in ("README.md", "FORMAT.md"))
    with Engine(model, n_ctx=512) as e:
        ids = e._tokenize(text, add_special=False)
    stride = max(1, (len(ids) - tokens) // n)
    out = [ids[i:i + tokens] for i in range(0, len(ids) - tokens + 1, stride)][:n]
    if len(out) < n:
        raise SystemExit(f"only {len(out)} windows of {tokens} tokens in the text")
    return [Example(tuple(w[:-8]), tuple(w[-8:])) for w in out]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--examples", type=int, default=500)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--weights-cache-mb", type=int, default=1024)
    a = ap.parse_args()
    import torch

    from edge_reft.train import TrainConfig
    from edge_reft.train.backbone import load_backbone
    from edge_reft.train.trainer import Trainer
    exs = examples(a.model, a.examples, a.tokens)
    rows = []
    for name, r in RECIPES.items():
        t0 = time.perf_counter()
        bb = load_backbone(a.model, device=a.device, cache_mb=a.weights_cache_mb)
        load_s = time.perf_counter() - t0
        n_layer = bb.base.n_layer
        layers = (n_layer // 2,) if r["layers"] == "mid" else None
        cfg = TrainConfig(layers=layers, rank=4, positions=r["positions"], epochs=1, batch_size=a.batch_size,
                          holdout=0, weights_cache_mb=a.weights_cache_mb)
        if a.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = Trainer(bb.model, exs, cfg, bb.base.n_embd)
        t0 = time.perf_counter()
        t.prepare()
        batches = t.batches()
        t.train_step(batches[0])  # warm-up (kernels, the weights cache)
        if a.device == "cuda":
            torch.cuda.synchronize()
        prefix_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for idx in batches[1:]:
            t.train_step(idx)
        if a.device == "cuda":
            torch.cuda.synchronize()
        steps_s = time.perf_counter() - t0
        done = sum(len(b) for b in batches[1:])
        peak = torch.cuda.max_memory_allocated() / 2**30 if a.device == "cuda" else float("nan")
        rows.append([f"{name} ({','.join(map(str, t.config.layers))})", f"{load_s:.1f}", f"{prefix_s:.1f}",
                     f"{steps_s:.1f}", f"{done / steps_s:.1f}", f"{len(exs) / (prefix_s + steps_s):.1f}",
                     f"{peak:.1f}", f"{t.losses[-1]:.3f}"])
        print(f"  {name} done", file=sys.stderr)
        del t, bb
        if a.device == "cuda":
            torch.cuda.empty_cache()
    dev = torch.cuda.get_device_name() if a.device == "cuda" else a.device
    print(table(["recipe (rank 4)", "load s", "prefix+warm-up s", "steps s", "steps ex/s", "epoch ex/s",
                 "peak GiB", "last loss"], rows,
                title=f"{a.model.rsplit('/', 1)[-1]} on {dev}: {a.examples} examples x {a.tokens} tokens, batch "
                      f"{a.batch_size}, one epoch, weights cache {a.weights_cache_mb} MiB"))


if __name__ == "__main__":
    main()
