"""``edge-reft train BASE --data DATA --out user.reft``: train a patch on a 4-bit backbone."""
from __future__ import annotations

import argparse
import os
import sys


def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected block indices like 15 or 12,18") from None


def parser() -> argparse.ArgumentParser:
    from edge_reft.train.trainer import DEFAULT_LR
    ap = argparse.ArgumentParser(prog="edge-reft train", description=__doc__)
    ap.add_argument("base", help="the user's .gguf (trains on exactly its weights) or an HF model folder (NF4)")
    ap.add_argument("--data", required=True, help='JSON Lines: {"prompt", "response"} or {"messages"}')
    ap.add_argument("--out", required=True, help="the .reft to write")
    ap.add_argument("--layers", type=_layers, default=(15,), help="blocks to edit, e.g. 15 or 12,18 (default 15)")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--positions", default="l1", help="l1, f1+l1, f3+l3, all, ... (default l1)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=DEFAULT_LR, help=f"AdamW learning rate, linear decay (default {DEFAULT_LR})")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--eval-data", default=None, help="JSONL scored after training (through llama.cpp)")
    ap.add_argument("--resume", action="store_true", help="continue the checkpoint in OUT.ckpt/")
    ap.add_argument("--backbone", choices=["gguf", "nf4"], default=None,
                    help="gguf: the file's own blocks (default for a .gguf); nf4: bitsandbytes (HF folders)")
    ap.add_argument("--no-prefix-cache", action="store_true",
                    help="run every step over the whole sequence and model (slower; same result)")
    ap.add_argument("--weights-cache-mb", type=int, default=1024,
                    help="MiB of dequantized GGUF weights kept between steps; past it a layer is "
                         "dequantized at each use (less memory, slower; default 1024)")
    ap.add_argument("--prefix-cache-mb", type=int, default=1024,
                    help="MiB of cached prefixes kept in memory; the rest go to disk (default 1024)")
    ap.add_argument("--name", default="")
    ap.add_argument("--description", default="")
    ap.add_argument("--force", action="store_true", help="replace an existing --out that is not a .reft file")
    return ap


def main(argv: list[str]) -> int:
    a = parser().parse_args(argv)
    from edge_reft.services.cli.inspect import format_patch
    from edge_reft.train import TrainConfig, train

    evaluate = None
    if a.eval_data is not None:
        from edge_reft.errors import ReftError
        from edge_reft.services.evaluate import evaluate_patch
        if not os.path.exists(a.eval_data):
            raise ReftError(f"--eval-data {a.eval_data}: no such file")
        evaluate = lambda patch: evaluate_patch(a.base, patch, a.eval_data)  # noqa: E731

    cfg = TrainConfig(layers=a.layers, rank=a.rank, positions=a.positions, epochs=a.epochs, lr=a.lr,
                      batch_size=a.batch_size, seed=a.seed, max_steps=a.max_steps,
                      prefix_cache=not a.no_prefix_cache, prefix_cache_mb=a.prefix_cache_mb,
                      weights_cache_mb=a.weights_cache_mb)
    try:
        patch = train(a.base, a.data, a.out, cfg, kind=a.backbone, evaluate=evaluate, resume=a.resume,
                      name=a.name, description=a.description, force=a.force,
                      inputs=(a.eval_data,) if a.eval_data else ())
    except KeyboardInterrupt:
        from pathlib import Path
        if (Path(f"{a.out}.ckpt") / "state.json").is_file():
            print("\nedge-reft train: interrupted; checkpoint saved, continue with --resume "
                  "(same flags)", file=sys.stderr)
        else:
            print("\nedge-reft train: interrupted before training started; nothing to resume",
                  file=sys.stderr)
        return 130
    print(format_patch(patch))
    return 0
