"""``edge-reft train BASE --data DATA --out user.reft``: train a patch on a 4-bit backbone."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any


# name -> (what it is for, its flags): README's recipe table
PRESETS = {
    "style": ("tone, format, a signature, a persona (the default)", {}),
    "classify": ("a label or a short answer as the first token (one block, the last prompt token)",
                 {"layers": "mid", "positions": "l1", "epochs": 3, "lr": 2e-3}),
    "facts": ("facts the model should know (rank 8, the first and last three prompt tokens)",
              {"rank": 8, "positions": "f3+l3"}),
}


def parser() -> argparse.ArgumentParser:
    from edge_reft.train.trainer import AUTO_WEIGHTS_CACHE

    from .common import add_model, verb_parser
    ap = verb_parser("train", __doc__, "edge-reft train -m model.gguf --data me.jsonl --out me.reft")
    add_model(ap, "the user's .gguf (trains on exactly its weights) or an HF model folder (NF4)", "base")
    ap.add_argument("--data", required=True, help='JSON Lines: {"prompt", "response"} or {"messages"}')
    ap.add_argument("--out", required=True, help="the .reft to write")
    add_recipe(ap)
    ap.add_argument("--eval-data", default=None, help="JSONL scored after training (through llama.cpp)")
    ap.add_argument("--resume", action="store_true", help="continue the checkpoint in OUT.ckpt/")
    add_backbone(ap)
    ap.add_argument("--no-prefix-cache", action="store_true",
                    help="run every step over the whole sequence and model (slower; same result)")
    ap.add_argument("--weights-cache-mb", type=int, default=None,
                    help="MiB of dequantized GGUF weights kept between steps; past it a layer is "
                         f"dequantized at each use (less memory, slower; default: everything the steps "
                         f"use when that is at most {AUTO_WEIGHTS_CACHE >> 20}, else 0)")
    ap.add_argument("--recompute", choices=["auto", "on", "off"], default="auto",
                    help="keep only each trained block's input and run the block again in backward: "
                         "far less memory for ~1/3 more time in those blocks, same gradients (auto: on "
                         "when a batch's activations would pass 512 MiB, or half a GPU's free memory)")
    ap.add_argument("--prefix-cache-mb", type=int, default=1024,
                    help="MiB of cached prefixes kept in memory; the rest go to disk (default 1024)")
    ap.add_argument("--name", default="", help="the patch's name (stored in the file)")
    ap.add_argument("--description", default="", help="a line about the patch (stored in the file)")
    ap.add_argument("--force", action="store_true", help="replace an existing --out that is not a .reft file")
    return ap


def add_backbone(ap: argparse.ArgumentParser) -> None:
    """Which backbone, on which device (train and train-many)."""
    from edge_reft.train.backbone import DEVICES
    ap.add_argument("--backbone", choices=["gguf", "nf4"], default=None,
                    help="gguf: the file's own blocks (default for a .gguf); nf4: bitsandbytes (HF folders)")
    ap.add_argument("--device", choices=DEVICES, default="auto",
                    help="where training computes: auto picks CUDA, then Apple's MPS, then the CPU")


def add_recipe(ap: argparse.ArgumentParser) -> None:
    """The options of one patch's training (train, and train-many's defaults for every user)."""
    from edge_reft.train.trainer import DEFAULT_LR

    from .common import layer_list
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="a recipe: " + "; ".join(f"{k}: {v[0]}" for k, v in sorted(PRESETS.items()))
                    + " (flags given as well win)")
    ap.add_argument("--layers", type=layer_list, default=None,
                    help="blocks to edit, e.g. 15 or 12,18 (default: four spread over the depth, "
                         "4,10,16,22 on a 30-block model)")
    ap.add_argument("--rank", type=int, default=None, help="rank of each intervention (default: 4)")
    ap.add_argument("--positions", default=None, help="l1, f1+l1, f3+l3, all, ... (default: f1+l1)")
    from edge_reft.interventions import TRAINABLE, TYPES
    ap.add_argument("--type", default="loreft", choices=TRAINABLE, metavar="TYPE",
                    help="intervention type: " + "; ".join(f"{n}: {TYPES[n].formula}" for n in TRAINABLE)
                    + " (default: loreft; direft drops the -Rh term and trains faster)")
    ap.add_argument("--epochs", type=int, default=None,
                    help="passes over the data (default: 3 to 10, more for small data: ~500 example passes)")
    ap.add_argument("--lr", type=float, default=None, help=f"AdamW learning rate, linear decay (default {DEFAULT_LR})")
    ap.add_argument("--batch-size", type=int, default=8, help="examples per step")
    ap.add_argument("--holdout", type=int, default=None,
                    help="examples held out and scored after each epoch; training stops after 2 "
                         "epochs without a better held-out loss and keeps the best (default: 10 %% "
                         "of 50 or more examples, at most 64; 0: off)")
    ap.add_argument("--seed", type=int, default=0, help="initialization and data order")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")


def config_of(a: argparse.Namespace, base: str) -> "Any":
    """The TrainConfig the recipe options ask for (a preset's values where no flag is given)."""
    from edge_reft.train import TrainConfig
    from edge_reft.train.trainer import DEFAULT_LR
    preset = PRESETS[a.preset][1] if a.preset else {}
    layers = a.layers if a.layers is not None else preset.get("layers")
    if layers == "mid":
        from edge_reft.fingerprint import base_model
        layers = (base_model(base).n_layer // 2,)
    return TrainConfig(layers=layers, rank=a.rank if a.rank is not None else preset.get("rank", 4),
                       positions=a.positions or preset.get("positions", "f1+l1"), type=a.type,
                       epochs=a.epochs if a.epochs is not None else preset.get("epochs"),
                       lr=a.lr if a.lr is not None else preset.get("lr", DEFAULT_LR),
                       batch_size=a.batch_size, seed=a.seed, max_steps=a.max_steps, holdout=a.holdout,
                       prefix_cache=not getattr(a, "no_prefix_cache", False),
                       prefix_cache_mb=getattr(a, "prefix_cache_mb", 1024),
                       weights_cache_mb=getattr(a, "weights_cache_mb", None),
                       recompute={"auto": None, "on": True, "off": False}[getattr(a, "recompute", "auto")])


def main(argv: list[str]) -> int:
    a = parser().parse_args(argv)
    from .common import model_of
    a.base = model_of(a, "base")
    from edge_reft.services.cli.inspect import format_patch
    from edge_reft.train import train

    evaluate = None
    if a.eval_data is not None:
        from edge_reft.errors import ReftError
        from edge_reft.services.evaluate import evaluate_patch
        if not os.path.exists(a.eval_data):
            raise ReftError(f"--eval-data {a.eval_data}: no such file")

        def say(msg: str) -> None:
            print(f"[train] eval: {msg}", file=sys.stderr, flush=True)
        evaluate = lambda patch: evaluate_patch(a.base, patch, a.eval_data, say=say)  # noqa: E731

    cfg = config_of(a, a.base)
    try:
        patch = train(a.base, a.data, a.out, cfg, kind=a.backbone, evaluate=evaluate, resume=a.resume,
                      name=a.name, description=a.description, force=a.force,
                      inputs=(a.eval_data,) if a.eval_data else (), device=a.device)
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
