"""The training entry: ``train(base, data, out, TrainConfig(...))`` checks, trains,
checkpoints and writes a patch."""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edge_reft import __version__
from edge_reft.dataset import encode, read_jsonl
from edge_reft.errors import ReftError
from edge_reft.files import sha256_file
from edge_reft.fingerprint import base_model
from edge_reft.outputs import check_output
from edge_reft.patch import BaseModel, Patch
from edge_reft.reftfile import load_patch, save_patch
from edge_reft.runtime import prompter_for
from .backbone import Backbone, check_trainable, load_backbone, pick_device
from .trainer import PATIENCE, TrainConfig, Trainer

# scores of a finished patch (e.g. services.evaluate.evaluate_patch on held-out data)
Evaluate = Callable[[Patch], dict[str, float]]


def train(base: str | os.PathLike[str], data: str | os.PathLike[str], out: str | os.PathLike[str],
          config: TrainConfig, *, backbone: Backbone | None = None, kind: str | None = None,
          evaluate: Evaluate | None = None, resume: bool = False, progress: bool = True,
          name: str = "", description: str = "", force: bool = False,
          inputs: tuple[str | os.PathLike[str], ...] = (), device: str = "auto") -> Patch:
    """Train, write ``out`` atomically (checkpoints in ``out``.ckpt/ until done), return the patch.
    ``evaluate`` scores the patch before it is written (its exact_match and first_token go into
    the provenance); ``inputs`` are more files ``out`` must not overwrite; ``device``: cpu, cuda,
    mps or auto (CUDA, then MPS, then the CPU).

    Everything that can be checked without the backbone is checked first (the base, the data,
    the output, the options against the model's shape), so a mistake costs a second, not a run."""
    out = Path(out)
    ckpt = out.with_name(out.name + ".ckpt")
    model = _check_inputs(base, data, config)
    device = pick_device(device) if backbone is None else backbone.device
    check_output(out, [base, data, *inputs], force=force)
    if ckpt.exists() and not resume:
        raise ReftError(f"{ckpt}: a checkpoint of an earlier run is here; pass --resume to continue "
                        "it, or delete it to start afresh")
    if resume and not (ckpt / "state.json").is_file():
        raise ReftError(f"{ckpt}: no checkpoint to resume (start without --resume)")
    t0 = time.perf_counter()
    prompter, close = prompter_for(base)
    try:
        examples, config = load_examples(data, prompter, config, model.n_layer)
    finally:
        close()
    if progress:
        held = f" ({config.holdout} held out for early stopping)" if config.holdout else ""
        print(f"[train] {len(examples)} examples{held}; layers {','.join(map(str, config.layers))} of "
              f"{model.n_layer}, positions {config.positions}, rank {config.rank}, {config.epochs} epochs, "
              f"lr {config.lr:g}, batch {config.batch_size}, on {device}", file=sys.stderr, flush=True)
    bb = backbone or load_backbone(base, kind, device=device)  # the Trainer sizes its weights cache
    trainer = Trainer(bb.model, examples, config, bb.base.n_embd, checkpoint_dir=ckpt)
    if progress and trainer.recompute:
        print("[train] blocks are recomputed in backward (less memory; --recompute off to keep "
              "their activations)", file=sys.stderr, flush=True)
    if resume:
        trainer.load_checkpoint()
    else:  # step 0 on disk before the first slow stage: an interrupt anywhere can be resumed
        trainer.save_checkpoint()
    try:
        return _finish(trainer, data, out, ckpt, config, bb, examples, evaluate, progress, name,
                       description, t0)
    except KeyboardInterrupt:
        raise  # the checkpoint stays: --resume continues it
    except BaseException:
        if trainer.step == 0 and not resume:  # a failure before any progress leaves nothing behind
            shutil.rmtree(ckpt, ignore_errors=True)
        raise


def load_examples(data: str | os.PathLike[str], prompter: Any, config: TrainConfig,
                  n_layer: int) -> tuple[list, TrainConfig]:
    """The encoded examples of ``data`` (the held-out part last) and the config resolved for them."""
    examples = encode(read_jsonl(data), prompter)
    config = config.resolved(n_layer, len(examples))
    if config.holdout:  # a fixed random part of the data, last: Trainer holds it out
        order = np.random.default_rng([config.seed, 7919]).permutation(len(examples))
        examples = [examples[i] for i in order]
    return examples, config


def _check_inputs(base: str | os.PathLike[str], data: str | os.PathLike[str], config: TrainConfig) -> BaseModel:
    """The base model's shape, after checking the files exist and the options fit it."""
    for flag, path in (("BASE", base), ("--data", data)):
        if not Path(path).exists():
            raise ReftError(f"{flag} {path}: no such file" + (" or folder" if flag == "BASE" else ""))
    if not Path(data).is_file():
        raise ReftError(f"--data {data}: not a regular file (expected JSON Lines)")
    model = base_model(base)
    if Path(base).is_file():
        check_trainable(Path(base), model.architecture)
    check_fits(base, model, config)
    return model


def check_fits(base: str | os.PathLike[str], model: BaseModel, config: TrainConfig) -> None:
    """The options against the model's shape."""
    problems = []
    if config.rank > model.n_embd:
        problems.append(f"--rank {config.rank}: more than the model's hidden size n_embd {model.n_embd}")
    bad = [L for L in config.layers or () if L >= model.n_layer]
    if bad:
        problems.append(f"--layers: block {bad[0]} does not exist (the model has blocks 0..{model.n_layer - 1})")
    if problems:
        raise ReftError(f"train {base}: " + "; ".join(problems))


def _finish(trainer: Trainer, data, out: Path, ckpt: Path, config: TrainConfig, bb: Backbone,
            examples: list, evaluate: Evaluate | None, progress: bool, name: str, description: str,
            t0: float) -> Patch:
    from tqdm import tqdm
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
        def on_epoch(epoch: int, loss: float, best: bool) -> None:
            if not quiet:
                bar.write(f"[train] epoch {epoch}: held-out loss {loss:.4f}{' (best)' if best else ''}",
                          file=sys.stderr)
        trainer.run(on_step, on_epoch)
    trainer.keep_best()
    if trainer.stopped_early and progress:
        print(f"[train] stopped early: no better held-out loss for {PATIENCE} epochs; kept epoch "
              f"{trainer.val_losses.index(min(trainer.val_losses)) + 1}", file=sys.stderr)
    return write_patch(trainer, data, out, ckpt, bb, evaluate, progress, name, description, t0)


def write_patch(trainer: Trainer, data, out: Path, ckpt: Path, bb: Backbone, evaluate: Evaluate | None = None,
                progress: bool = False, name: str = "", description: str = "", t0: float = 0.0) -> Patch:
    """A finished trainer's patch (its best epoch's, with the run's provenance) written to
    ``out`` atomically; its checkpoint folder removed; the patch as read back."""
    config = trainer.config
    tail = trainer.losses[-max(1, len(trainer.losses) // 10):]
    provenance: dict[str, Any] = {
        "tool": f"edge-reft {__version__}", "data": Path(data).name, "data_sha256": sha256_file(data),
        "examples": len(trainer.examples), "steps": trainer.step, "epochs": config.epochs,
        "batch_size": config.batch_size, "lr": config.lr, "seed": config.seed, "layers": list(config.layers),
        "rank": config.rank, "type": config.type,
        "positions": config.positions, "backbone": bb.kind, "device": bb.device,
        "final_loss": sum(tail) / len(tail),
        "train_seconds": round(time.perf_counter() - t0, 2),
    }
    if trainer.val_losses:
        provenance.update({"holdout": config.holdout, "heldout_loss": round(min(trainer.val_losses), 5),
                           "epochs_run": len(trainer.val_losses)})
    patch = trainer.reft.to_patch(bb.base, name or out.stem, description, provenance)
    if evaluate is not None:
        if progress:
            print("[train] scoring the patch on the evaluation data (greedy replies)...", file=sys.stderr, flush=True)
        metrics = evaluate(patch)
        provenance.update({f"eval_{k}": round(v, 4) for k, v in metrics.items() if k != "n"})
        patch = Patch(patch.base, patch.interventions, patch.name, patch.description, provenance)
    save_patch(patch, out)
    if trainer.cache is not None:
        trainer.cache.close()
    shutil.rmtree(ckpt, ignore_errors=True)
    return load_patch(out)  # as written (its path and size for the card), read back and checked
