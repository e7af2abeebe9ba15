"""The training loop: batches, the cached forward, loss, AdamW, checkpoints.

Loss is the mean cross-entropy over the reply tokens of a batch (end of turn
included).  Batches follow a permutation drawn per epoch from the seed, and
the optimizer state is checkpointed with the step, so an interrupted run
resumed with ``resume=True`` continues bit for bit.
"""
from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from edge_reft.errors import ReftError
from edge_reft.files import atomic_path, write_text
from edge_reft.positions import PositionRule
from . import fleet, prefix
from .ggufq import GGUFLinear
from edge_reft.dataset import Example
from .interventions import Spec, TrainableReft, trainable_type
from .recompute import auto_recompute

DEFAULT_LR = 4e-3  # the top of pyreft's range (5e-4 .. 4e-3): small data sets need the steps to count
# Where the default patch edits, as fractions of the depth: four blocks from early to late
# (SmolLM2's 30 blocks: 4, 10, 16, 22), so it can move both what is said and how.
SPREAD = (0.13, 0.33, 0.53, 0.73)
EXAMPLE_PASSES = 500  # default epochs: enough passes that 100 examples get ~60 updates
HOLDOUT_FROM = 50     # data sets this large hold out 10 % (at most 64) for early stopping
PATIENCE = 2          # epochs without a better held-out loss before training stops


def spread_layers(n_layer: int) -> tuple[int, ...]:
    return tuple(sorted({min(n_layer - 1, round(n_layer * f)) for f in SPREAD}))


def auto_holdout(n_examples: int) -> int:
    return min(64, n_examples // 10) if n_examples >= HOLDOUT_FROM else 0


def auto_epochs(n_examples: int) -> int:
    """3 epochs for large data sets, up to 10 for small ones (EXAMPLE_PASSES in all)."""
    return min(10, max(3, math.ceil(EXAMPLE_PASSES / max(n_examples, 1))))


@dataclass
class TrainConfig:
    """Options of a training run.  ``layers`` None: four blocks spread over the depth
    (``spread_layers``); ``epochs`` None: scaled to the data (``auto_epochs``); both are
    fixed by ``resolved`` once the model and the data are known."""
    layers: tuple[int, ...] | None = None
    rank: int = 4
    positions: str = "f1+l1"
    type: str = "loreft"              # an edge_reft.interventions type that can be trained
    epochs: int | None = None
    lr: float = DEFAULT_LR
    batch_size: int = 8
    seed: int = 0
    max_steps: int | None = None
    prefix_cache: bool = True         # False: the plain full forward every step (pyreft's way)
    prefix_cache_mb: int = 1024       # memory for cached prefixes before they spill to disk
    weights_cache_mb: int | None = None  # dequantized GGUF weights kept (None: auto_weights_cache)
    recompute: bool | None = None     # keep block inputs only, recompute in backward (None: auto_recompute)
    checkpoint_every: int = 200
    holdout: int | None = None        # examples held out for early stopping; None: auto_holdout, 0: off
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        if self.layers is not None and (not self.layers or any(not isinstance(L, int) or L < 0
                                                                for L in self.layers)):
            problems.append(f"layers: {self.layers!r}, expected block indices >= 0")
        if not isinstance(self.rank, int) or self.rank < 1:
            problems.append(f"rank: {self.rank!r}, expected an integer >= 1")
        try:
            PositionRule.parse(self.positions)
        except ReftError as e:
            problems.append(str(e))
        try:
            trainable_type(self.type)
        except ReftError as e:
            problems.append(str(e))
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            problems.append(f"lr: {self.lr!r}, expected a number in (0, 1)")
        for name in ("epochs", "batch_size"):
            if name == "epochs" and self.epochs is None:
                continue
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                problems.append(f"{name}: {getattr(self, name)!r}, expected an integer >= 1")
        for name in ("prefix_cache_mb", "weights_cache_mb"):
            if name == "weights_cache_mb" and self.weights_cache_mb is None:
                continue
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                problems.append(f"{name}: {getattr(self, name)!r}, expected an integer >= 0 (MiB)")
        if self.holdout is not None and (not isinstance(self.holdout, int) or self.holdout < 0):
            problems.append(f"holdout: {self.holdout!r}, expected an integer >= 0 (0: off)")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"max_steps: {self.max_steps!r}, expected an integer >= 1")
        if problems:
            raise ReftError("train: " + "; ".join(problems))

    def resolved(self, n_layer: int, n_examples: int) -> "TrainConfig":
        """This config with the automatic choices made for a model and a data set."""
        from dataclasses import replace
        holdout = self.holdout if self.holdout is not None else auto_holdout(n_examples)
        if holdout >= n_examples:
            raise ReftError(f"holdout: {holdout} of {n_examples} examples leaves none to train on")
        return replace(self, layers=self.layers if self.layers is not None else spread_layers(n_layer),
                       epochs=self.epochs if self.epochs is not None else auto_epochs(n_examples - holdout),
                       holdout=holdout)

    def specs(self) -> list[Spec]:
        rule = PositionRule.parse(self.positions)
        return [Spec(L, rule, self.rank, self.type) for L in self.layers]


def batches(n_examples: int, config: TrainConfig) -> list[np.ndarray]:
    """Example indices of every step: a permutation per epoch, drawn from (seed, epoch)."""
    out = []
    for epoch in range(config.epochs):
        order = np.random.default_rng([config.seed, epoch]).permutation(n_examples)
        out += [order[i:i + config.batch_size] for i in range(0, n_examples, config.batch_size)]
    return out[:config.max_steps] if config.max_steps else out


def logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on final-normed hidden states (with the model's logit soft-capping, if any)."""
    out = model.lm_head(hidden)
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    return torch.tanh(out / cap) * cap if cap else out


AUTO_WEIGHTS_CACHE = 1 << 30


def auto_weights_cache(model: Any, first_layer: int) -> int:
    """Bytes of dequantized weights to keep: all the steps use (the blocks from the first
    edited one, and the head) when that is at most 1 GiB (on a CUDA device: half its free
    memory), else none.  A cache holding part of a large model saves only that part's
    dequantizing and costs its memory at full width; without one the weights stay 4-bit (a
    1 B model trains in its file size + ~1.2 GiB)."""
    from .hf import decoder_layers
    layers = decoder_layers(model)
    used = {id(m): 4 * m.out_features * m.in_features
            for block in list(layers)[first_layer:] for m in block.modules() if isinstance(m, GGUFLinear)}
    head = model.get_output_embeddings()
    if isinstance(head, GGUFLinear):
        used[id(head)] = 4 * head.out_features * head.in_features
    need = sum(used.values())
    return need if need <= prefix.room(model, AUTO_WEIGHTS_CACHE) else 0


def _weight_caches(model: Any) -> list:
    return list({id(m.cache): m.cache for m in model.modules()
                 if isinstance(m, GGUFLinear) and m.cache is not None}.values())


@contextmanager
def prefix_weights(model: Any, config: TrainConfig) -> Iterator[None]:
    """While the prefix pass runs every block: keep every dequantized weight when the whole
    model's fit the automatic budget (SmolLM2: 100 examples' pass 15.9 s -> 10.1 s on 2 cores),
    then the steps' working set only (the blocks from the first edited one, and the head)."""
    caches = _weight_caches(model)
    steps = [c.budget for c in caches]
    if config.weights_cache_mb is None:
        for c in caches:
            c.budget = max(c.budget, auto_weights_cache(model, 0))
    try:
        yield
    finally:
        for c, budget in zip(caches, steps):
            c.reset()
            c.budget = budget


class Trainer:
    """Trains on ``examples`` except the last ``config.holdout`` (the caller shuffles), which
    are scored after every epoch; with a holdout, training stops after PATIENCE epochs without
    a better held-out loss and the best epoch's parameters are kept."""

    def __init__(self, model: Any, examples: Sequence[Example], config: TrainConfig, n_embd: int,
                 checkpoint_dir: str | os.PathLike[str] | None = None):
        n_layer = model.config.get_text_config().num_hidden_layers
        config = config.resolved(n_layer, len(examples))
        bad = [L for L in config.layers if L >= n_layer]
        if bad:
            raise ReftError(f"train: layer {bad[0]} does not exist (the model has blocks 0..{n_layer - 1})")
        if not examples:
            raise ReftError("train: no examples")
        self.model, self.examples, self.config = model, list(examples), config
        self.n_train = len(self.examples) - config.holdout
        self.val_losses: list[float] = []
        self.best: tuple[float, dict] | None = None
        self.device = prefix.model_device(model)
        self.reft = TrainableReft(config.specs(), n_embd, config.seed).to(self.device)
        self.first_layer = min(config.layers)
        self.opt = torch.optim.AdamW(self.reft.parameters(), lr=config.lr, weight_decay=0.0)
        per_epoch = self.per_epoch = math.ceil(self.n_train / config.batch_size)
        self.total = min(per_epoch * config.epochs, config.max_steps or 1 << 62)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: max(0.0, 1 - s / self.total))
        self.step, self.losses = 0, []
        self.ckpt = Path(checkpoint_dir) if checkpoint_dir else None
        self.cache: prefix.PrefixCache | None = None
        # the config sizes the backbone's weights cache (it is the one place that says how much)
        mb = config.weights_cache_mb
        budget = auto_weights_cache(model, self.first_layer) if mb is None else mb << 20
        for c in _weight_caches(model):
            c.budget = budget
        # what a step runs through the trained blocks: positions first_edited.. with the prefix
        # cache (an l1 row: the prompt's last token and the reply), every position without it
        # per example: the positions before the first edited one (cached, attended to) and the
        # positions a step runs through the trained blocks (l1 rows: the prompt's last token and
        # the reply); without the prefix cache every position runs
        self.past = [self.reft.first_edited(len(e.prompt)) if config.prefix_cache else 0 for e in self.examples]
        self.ran = [len(e.tokens) - p for e, p in zip(self.examples, self.past)]
        self.recompute = config.recompute if config.recompute is not None else auto_recompute(
            model, self.first_layer, self.ran, config.batch_size)
        self._batches: list | None = None

    # ---- one batch ---------------------------------------------------------------
    def batch_loss(self, idx: Sequence[int]) -> tuple[torch.Tensor, int]:
        """Summed reply-token cross-entropy of examples ``idx`` and their token count."""
        return fleet.losses([(self, idx)], self.recompute)[0]

    # ---- the loop (train.fleet: one loop for one user or many) ------------------------
    def prepare(self, progress: Callable[[int], None] = lambda n: None) -> None:
        if self.config.prefix_cache and self.cache is None:
            self.cache = prefix.PrefixCache(self.config.prefix_cache_mb << 20,
                                            self.ckpt / "prefix" if self.ckpt else None)
            if self.ckpt:
                (self.ckpt / "prefix").mkdir(parents=True, exist_ok=True)
            with prefix_weights(self.model, self.config):
                prefix.build(self.model, self.examples, self.first_layer, self.reft.first_edited, self.cache,
                             batch=self.config.batch_size, progress=progress)

    def batches(self) -> list[np.ndarray]:
        return batches(self.n_train, self.config)[:self.total]

    def next_batch(self) -> np.ndarray:
        if self._batches is None:
            self._batches = self.batches()
        return self._batches[self.step]

    @property
    def done(self) -> bool:
        return self.stopped_early or self.step >= self.total

    def held_out_loss(self) -> float:
        """Mean reply-token cross-entropy of the held-out examples under the current patch."""
        return fleet.held_out([self])[0]

    def end_epoch(self, loss: float) -> None:
        """Record an epoch's held-out ``loss``; stop after PATIENCE epochs without a better one."""
        self.val_losses.append(loss)
        if self.best is None or loss < self.best[0]:
            self.best = (loss, {k: t.detach().clone() for k, t in self.reft.state_dict().items()})
        best_at = self.val_losses.index(min(self.val_losses))
        self.stopped_early = len(self.val_losses) - 1 - best_at >= PATIENCE

    def keep_best(self) -> None:
        """Put back the parameters of the epoch with the best held-out loss."""
        if self.best is not None:
            self.reft.load_state_dict(self.best[1])

    def train_step(self, idx: Sequence[int]) -> float:
        """One step on examples ``idx`` (outside the schedule of batches: benchmarks, tests)."""
        return fleet.step([(self, idx)])[0]

    stopped_early = False

    def run(self, on_step: Callable[[int, float], None] = lambda s, l: None,
            on_epoch: Callable[[int, float, bool], None] = lambda e, v, best: None) -> None:
        """Train to the end (or an early stop), checkpointing; Ctrl-C saves a checkpoint and
        re-raises.  ``on_epoch(epoch, held-out loss, is best)`` hears each epoch's score."""
        fleet.run([self], lambda t, s, l: on_step(s, l), lambda t, e, v, best: on_epoch(e, v, best))

    # ---- checkpoints --------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        from safetensors.torch import save_file
        assert self.ckpt is not None
        self.ckpt.mkdir(parents=True, exist_ok=True)
        tensors = {f"param.{k}": v.detach().cpu().clone() for k, v in self.reft.state_dict().items()}
        opt = self.opt.state_dict()
        for pid, st in opt["state"].items():
            for k, v in st.items():
                tensors[f"opt.{pid}.{k}"] = v.detach().cpu().clone().reshape(v.shape)
        if self.best is not None:
            tensors.update({f"best.{k}": v.cpu() for k, v in self.best[1].items()})
        meta = {"step": self.step, "losses": self.losses, "config": asdict(self.config),
                "val_losses": self.val_losses, "best_loss": self.best[0] if self.best else None,
                "param_groups": opt["param_groups"], "n_examples": len(self.examples)}
        with atomic_path(self.ckpt / "state.safetensors") as tmp:
            save_file(tensors, tmp)
        write_text(self.ckpt / "state.json", json.dumps(meta))  # last: it names a complete state
        return self.ckpt

    def load_checkpoint(self) -> bool:
        from safetensors.torch import load_file
        if not self.ckpt or not (self.ckpt / "state.json").exists():
            return False
        meta = json.loads((self.ckpt / "state.json").read_text())
        saved = {k: v for k, v in meta["config"].items() if k not in ("max_steps", "checkpoint_every", "recompute",
                                                                        "prefix_cache_mb", "extra")}
        now = {k: v for k, v in asdict(self.config).items() if k in saved}
        now["layers"] = list(now["layers"])
        if saved != now or meta["n_examples"] != len(self.examples):
            raise ReftError(f"{self.ckpt}: the checkpoint was made with other settings or data "
                            f"({saved}, {meta['n_examples']} examples); start afresh or match them")
        t = load_file(self.ckpt / "state.safetensors", device=str(self.device))
        self.reft.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("param.")})
        self.val_losses = meta.get("val_losses", [])
        if meta.get("best_loss") is not None:
            self.best = (meta["best_loss"], {k[5:]: v for k, v in t.items() if k.startswith("best.")})
        state: dict = {}
        for k, v in t.items():
            if k.startswith("opt."):
                _, pid, name = k.split(".", 2)
                state.setdefault(int(pid), {})[name] = v
        self.opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        self.step, self.losses = meta["step"], meta["losses"]
        self.sched.last_epoch = self.step
        for g in self.opt.param_groups:
            g["lr"] = self.config.lr * max(0.0, 1 - self.step / self.total)
        return True

