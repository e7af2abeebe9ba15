"""The training loop, for one user or many: one frozen backbone, one batch.

A step takes every unfinished user's next batch (its own data order, drawn from its own
seed) and runs the rows of all of them through the trained blocks in one forward, in
chunks that fit the memory budget.  The rows of each user are edited with its own
parameters (``BatchHooks`` members), each user's loss is the mean over its own reply
tokens, and one backward of their sum gives every user exactly the gradient of its own
loss (no parameter is shared).  Then each user's own AdamW and learning-rate schedule
step.  Held-out scoring, early stopping, checkpoints and the end come at each user's own
steps.  A user's patch is therefore what it gets training alone with the same seed, to
float32 round-off: the same operations on the same numbers, in batches of other shapes.

``edge-reft train`` is a fleet of one (``Trainer.run``); ``edge-reft train-many`` is the
fleet (``edge_reft.train.many``).
"""
from __future__ import annotations

import signal
import threading
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from . import prefix
from .interventions import BatchHooks, TrainableReft
from .recompute import activation_bytes, recomputed

if TYPE_CHECKING:
    from .trainer import Trainer

Part = tuple["Trainer", Sequence[int]]  # rows: example indices of one user
FLEET_BUDGET = 2 << 30  # activations of one forward of a fleet on the CPU or MPS (CUDA: half its free memory)


def masks(reft: TrainableReft, rows: Sequence[tuple[int, int, int]], width: int,
          device: torch.device) -> list[torch.Tensor]:
    """Per spec of ``reft``, (len(rows), width) bool: rows are (n_prompt, first position, length)."""
    out = []
    for s in reft.specs:
        m = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, (n, start, length) in enumerate(rows):
            pos = np.arange(start, start + length)
            hit = np.ones(length, bool) if s.rule.all else np.isin(pos, s.rule.select(n))
            m[i, :length] = torch.from_numpy(hit)
        out.append(m.to(device))
    return out


def losses(parts: Sequence[Part], recompute: bool) -> list[tuple[torch.Tensor, int]]:
    """Summed reply-token cross-entropy and token count of each part, all in one forward.
    The parts share the backbone, the lowest trained block and the prefix-cache setting."""
    from .hf import decoder_layers
    from .trainer import logits
    first = parts[0][0]
    model, device = first.model, first.device
    spans, rows, entries, seqs = [], [], [], []
    for t, idx in parts:
        exs = [t.examples[i] for i in idx]
        if first.config.prefix_cache:
            got = [t.cache.get(i) for i in idx]
            entries += got
            r = [(len(e.prompt), en.p0, len(e.tokens) - en.p0) for e, en in zip(exs, got)]
        else:
            seqs += [e.tokens for e in exs]
            r = [(len(e.prompt), 0, len(e.tokens)) for e in exs]
        spans.append(slice(len(rows), len(rows) + len(r)))
        rows += r
    width = max(r[2] for r in rows)
    members = [(t.reft, span, masks(t.reft, rows[span], width, device)) for (t, _), span in zip(parts, spans)]
    with recomputed(decoder_layers(model), first.first_layer, recompute), BatchHooks(model, members):
        if first.config.prefix_cache:
            hidden = prefix.cached_forward(model, entries, first.first_layer)
        else:
            ids, mask = prefix.pad_batch(seqs, device)
            hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    at_row, at_pos, targets, bounds = [], [], [], []  # where each reply token's logits come from
    for (t, idx), span in zip(parts, spans):
        start = len(targets)
        for row, i, (n, p, _) in zip(range(span.start, span.stop), idx, rows[span]):
            target = t.examples[i].target
            r0 = n - 1 - p  # the logits at prompt position n-1 predict the first reply token
            at_row += [row] * len(target)
            at_pos += range(r0, r0 + len(target))
            targets.extend(target)
        bounds.append((start, len(targets)))
    out = logits(model, hidden[torch.tensor(at_row, device=hidden.device), torch.tensor(at_pos, device=hidden.device)])
    target = torch.tensor(targets, device=out.device)
    if len(parts) == 1:
        return [(torch.nn.functional.cross_entropy(out, target, reduction="sum"), len(targets))]
    each = torch.nn.functional.cross_entropy(out, target, reduction="none")  # slices of it, not of the logits
    return [(each[a:b].sum(), b - a) for a, b in bounds]


def _tokens(part: Part) -> int:
    t, idx = part
    return sum(t.ran[i] for i in idx)


def _shape(part: Part) -> tuple[int, int]:
    """(longest row, longest cached prefix): a forward pads every row to both."""
    t, idx = part
    return max(t.ran[i] for i in idx), max(t.past[i] for i in idx)


def _cost(chunk: Sequence[Part]) -> tuple[int, int]:
    """(positions a forward of ``chunk`` computes and attends to as padded, as needed)."""
    width = max(_shape(p)[0] for p in chunk)
    past = max(_shape(p)[1] for p in chunk)
    rows = sum(len(idx) for _, idx in chunk)
    need = sum(t.ran[i] + t.past[i] for t, idx in chunk for i in idx)
    return rows * (width + past), need


PADDING = 1.5  # a fleet forward may compute and attend to at most this many padded positions per real one


def chunks(parts: Sequence[Part]) -> list[tuple[list[Part], bool]]:
    """The parts in forwards that can share a batch (same lowest block, same prefix setting)
    and are alike in shape (rows are padded to the longest row and the longest cached prefix:
    an ``l1`` user's 3-token rows do not run at the width of an ``all`` user's 300, nor
    attend over a 300-token prompt's padding), each within the activation budget; with the
    recompute setting of each.  A lone user keeps its own setting (``Trainer.recompute``); a
    fleet recomputes only a chunk that alone passes the budget."""
    if len(parts) == 1:
        return [([parts[0]], parts[0][0].recompute)]
    groups: dict[tuple, list[Part]] = {}
    for p in sorted(parts, key=_shape):
        groups.setdefault((p[0].first_layer, p[0].config.prefix_cache), []).append(p)
    out = []
    for (first_layer, _), group in groups.items():
        t = group[0][0]
        cfg = t.model.config.get_text_config()
        per_token = activation_bytes(cfg, cfg.num_hidden_layers - first_layer, 1)
        budget = prefix.room(t.model, FLEET_BUDGET) // per_token
        chunk: list[Part] = []
        for p in group:
            padded, need = _cost(chunk + [p])
            if chunk and (sum(map(_tokens, chunk)) + _tokens(p) > budget or padded > PADDING * need):
                out.append((chunk, sum(map(_tokens, chunk)) > budget))
                chunk = []
            chunk.append(p)
        out.append((chunk, sum(map(_tokens, chunk)) > budget))
    return out


def held_out(trainers: Sequence["Trainer"]) -> list[float]:
    """Each trainer's mean reply-token cross-entropy on its held-out examples."""
    parts = [(t, list(range(t.n_train, len(t.examples)))) for t in trainers]
    sums: dict[int, list[float]] = {id(t): [0.0, 0] for t in trainers}
    with torch.no_grad():
        for chunk, rc in chunks(parts):
            for (t, _), (loss, n) in zip(chunk, losses(chunk, rc)):
                sums[id(t)][0] += float(loss)
                sums[id(t)][1] += n
    return [sums[id(t)][0] / sums[id(t)][1] for t in trainers]


def step(parts: Sequence[Part]) -> list[float]:
    """One optimizer step of each part's trainer on the part's rows; their losses."""
    trainers = [t for t, _ in parts]
    for t in trainers:
        t.opt.zero_grad(set_to_none=True)
    values: dict[int, float] = {}
    for chunk, rc in chunks(parts):
        total = None
        for (t, _), (loss, n) in zip(chunk, losses(chunk, rc)):
            term = loss / n
            total = term if total is None else total + term
            values[id(t)] = float(loss.detach()) / n
        total.backward()
    for t in trainers:
        t.opt.step()
        t.sched.step()
        t.step += 1
        t.losses.append(values[id(t)])
    return [values[id(t)] for t in trainers]


def run(trainers: Sequence["Trainer"], on_step: Callable[["Trainer", int, float], None] = lambda t, s, l: None,
        on_epoch: Callable[["Trainer", int, float, bool], None] = lambda t, e, v, best: None,
        on_done: Callable[["Trainer"], None] = lambda t: None) -> None:
    """Train every trainer to its end (or early stop); ``on_done(t)`` as soon as t is finished.
    Checkpoints at each trainer's own cadence; Ctrl-C checkpoints every unfinished trainer
    that has a checkpoint folder, and re-raises."""
    interrupted: list[int] = []
    watch = any(t.ckpt for t in trainers) and threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGINT, lambda *a: interrupted.append(1)) if watch else None
    active = [t for t in trainers if not t.done]
    try:
        while active:
            for t, loss in zip(active, step([(t, t.next_batch()) for t in active])):
                on_step(t, t.step, loss)
            ending = [t for t in active if t.config.holdout and (t.step % t.per_epoch == 0 or t.step == t.total)]
            for t, v in zip(ending, held_out(ending) if ending else ()):
                t.end_epoch(v)
                on_epoch(t, len(t.val_losses), v, v == t.best[0])
            for t in active:
                if t.ckpt and (t.step % t.config.checkpoint_every == 0 or t.stopped_early):
                    t.save_checkpoint()
            if interrupted:
                raise KeyboardInterrupt
            finished = [t for t in active if t.done]
            active = [t for t in active if not t.done]
            for t in finished:
                on_done(t)
    except KeyboardInterrupt:
        for t in active:
            if t.ckpt:
                t.save_checkpoint()
        raise
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)

