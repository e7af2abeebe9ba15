"""Train a patch on a 4-bit backbone: ``train(base, data, out, TrainConfig(...))``.

Imports torch and transformers; nothing in the runtime imports this package.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import ReftError
from ..patch import Patch
from ..reftfile import save_patch
from .backbone import Backbone, load_backbone
from ..dataset import encode, file_sha256, prompter_for, read_jsonl
from .trainer import DEFAULT_LR, TrainConfig, Trainer

__all__ = ["train", "TrainConfig", "Trainer", "DEFAULT_LR", "load_backbone", "Backbone"]


def train(base: str | os.PathLike[str], data: str | os.PathLike[str], out: str | os.PathLike[str],
          config: TrainConfig, *, backbone: Backbone | None = None, kind: str | None = None,
          eval_data: str | os.PathLike[str] | None = None, resume: bool = False, progress: bool = True,
          name: str = "", description: str = "") -> Patch:
    """Train, write ``out`` atomically (checkpoints in ``out``.ckpt/ until done), return the patch."""
    from tqdm import tqdm

    out = Path(out)
    ckpt = out.with_name(out.name + ".ckpt")
    if ckpt.exists() and not resume:
        raise ReftError(f"{ckpt}: a checkpoint of an earlier run is here; pass --resume to continue "
                        "it, or delete it to start afresh")
    t0 = time.perf_counter()
    prompter, close = prompter_for(base)
    try:
        examples = encode(read_jsonl(data), prompter)
    finally:
        close()
    bb = backbone or load_backbone(base, kind, cache_mb=config.weights_cache_mb)
    trainer = Trainer(bb.model, examples, config, bb.base.n_embd, checkpoint_dir=ckpt)
    if resume and not trainer.load_checkpoint():
        raise ReftError(f"{ckpt}: no checkpoint to resume")
    quiet = not progress
    with tqdm(total=len(examples), desc="caching prefixes", unit="ex", disable=quiet, file=sys.stderr) as bar:
        trainer.prepare(bar.update)
    t1 = time.perf_counter()
    bs = config.batch_size
    with tqdm(total=trainer.total, initial=trainer.step, desc="training", unit="step", disable=quiet,
              file=sys.stderr) as bar:
        def on_step(step: int, loss: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", ex_s=f"{bar.n * bs / max(time.perf_counter() - t1, 1e-9):.1f}")
        trainer.run(on_step)
    tail = trainer.losses[-max(1, len(trainer.losses) // 10):]
    provenance: dict[str, Any] = {
        "tool": f"edge-reft {__version__}", "data": Path(data).name, "data_sha256": file_sha256(data),
        "examples": len(examples), "steps": trainer.step, "epochs": config.epochs, "batch_size": bs,
        "lr": config.lr, "seed": config.seed, "layers": list(config.layers), "rank": config.rank,
        "positions": config.positions, "backbone": bb.kind, "final_loss": sum(tail) / len(tail),
        "train_seconds": round(time.perf_counter() - t0, 2),
    }
    patch = trainer.reft.to_patch(bb.base, name or out.stem, description, provenance)
    if eval_data is not None:
        from ..evaluate import evaluate_patch
        metrics = evaluate_patch(base, patch, eval_data)
        provenance.update({f"eval_{k}": v for k, v in metrics.items() if k in ("exact_match", "first_token")})
        patch = Patch(patch.base, patch.interventions, patch.name, patch.description, provenance)
    save_patch(patch, out)
    if trainer.cache is not None:
        trainer.cache.close()
    shutil.rmtree(ckpt, ignore_errors=True)
    return patch
