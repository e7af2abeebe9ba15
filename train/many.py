"""``train_many(base, jobs)``: every user's patch in one process, over one loaded backbone.

A job is one user: a name, a data file and the ``train`` options that user wants (the
run's options fill in the rest).  Jobs come from a JSON Lines file, one user a line::

    {"name": "alice", "data": "alice.jsonl", "positions": "l1", "seed": 3}

(``data`` relative to the jobs file), or from a folder: every ``NAME.jsonl`` in it is a
user's data, with its options in ``NAME.json`` when there is one.  Each patch goes to
``OUT_DIR/NAME.reft``.

All users train in one fleet (``train.fleet``): their rows share each step's forward,
each user with its own parameters, optimizer, schedule, seed and epochs, so each patch is
what ``edge-reft train`` makes for that user alone.  A user whose job, data or options are
wrong fails alone with the reason; every finished patch is written atomically as soon as
it is done; each user checkpoints in ``NAME.reft.ckpt/`` as ``train`` does, so Ctrl-C and
``resume`` work per user (a user whose patch is already written from the same data and
options is skipped on resume).
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from edge_reft.errors import ReftError
from edge_reft.files import sha256_file, write_text
from edge_reft.outputs import check_output
from .trainer import TrainConfig

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# the options a job may set (TrainConfig's fields for one user's run)
OPTIONS = ("layers", "rank", "positions", "type", "epochs", "lr", "batch_size", "seed", "holdout", "max_steps")
MAX_JOB_LINE = 1 << 16
FLEET_PREFIX_BATCH = {"cpu": 8, "cuda": 64}  # examples a prefix-pass forward (2 cores: 8 beat 16 and 32, 35 s vs 46)
DEFAULT_PREFIX_MB = 4096  # cached prefixes of all users kept in memory (the rest spill to disk)


@dataclass
class Job:
    name: str
    data: Path | None = None
    config: TrainConfig | None = None
    error: str | None = None     # why this user cannot train (set: the other fields may be unset)


@dataclass
class Outcome:
    """What became of one user: ``written``, ``skipped`` (resume: done before) or ``failed``."""
    name: str
    status: str
    out: str = ""
    error: str = ""
    steps: int = 0
    heldout_loss: float | None = None
    extra: dict = field(default_factory=dict)


# ---- jobs -------------------------------------------------------------------------------
def read_jobs(source: str | os.PathLike[str], defaults: TrainConfig) -> list[Job]:
    """The jobs of a JSON Lines file or a folder (see the module's doc).  A job that is wrong
    comes back with its ``error``; only a source that cannot be read at all, or names that
    collide, raise."""
    src = Path(source)
    if src.is_dir():
        jobs = []
        for data in sorted(src.glob("*.jsonl")):
            opts_file = data.with_suffix(".json")
            try:
                opts = json.loads(opts_file.read_text()) if opts_file.is_file() else {}
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                jobs.append(Job(data.stem, error=f"{opts_file}: not readable JSON ({e})"))
                continue
            if not isinstance(opts, dict) or "data" in opts or "name" in opts:
                jobs.append(Job(data.stem, error=f"{opts_file}: expected an object of options "
                                                 f"({', '.join(OPTIONS)}); name and data come from the file name"))
                continue
            jobs.append(_job({"name": data.stem, "data": data.name, **opts}, src, defaults, str(opts_file)))
    elif src.is_file():
        jobs = []
        with open(src, "rb") as f:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                where = f"{src}:{n}"
                try:
                    if len(raw) > MAX_JOB_LINE:
                        raise ValueError(f"a line of {len(raw)} bytes (at most {MAX_JOB_LINE})")
                    line = json.loads(raw)
                except (ValueError, UnicodeDecodeError) as e:
                    jobs.append(Job(f"line {n}", error=f"{where}: not a JSON object ({e})"))
                    continue
                jobs.append(_job(line, src.parent, defaults, where))
    else:
        raise ReftError(f"--jobs {src}: no such file or folder (expected a JSON Lines file of jobs, "
                        "or a folder of NAME.jsonl data files)")
    if not jobs:
        raise ReftError(f"--jobs {src}: no jobs in it (expected one JSON object a line, or NAME.jsonl files)")
    seen: dict[str, int] = {}
    for j in jobs:
        seen[j.name.lower()] = seen.get(j.name.lower(), 0) + 1
    twice = sorted(n for n, c in seen.items() if c > 1)
    if twice:  # which one is meant is not ours to guess, and both would write NAME.reft
        raise ReftError(f"--jobs {src}: the name {twice[0]!r} is used by more than one job "
                        "(names are case-insensitive: they name the output files)")
    return jobs


def _job(line: Any, base_dir: Path, defaults: TrainConfig, where: str) -> Job:
    if not isinstance(line, dict):
        return Job(where, error=f"{where}: expected a JSON object with name and data")
    name = line.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        return Job(where, error=f"{where}: name {name!r}, expected 1-64 letters, digits, '.', '_' or '-' "
                                "(it names the output file)")
    unknown = sorted(set(line) - {"name", "data", *OPTIONS})
    if unknown:
        return Job(name, error=f"{where}: unknown key {unknown[0]!r} (expected name, data and options "
                               f"among {', '.join(OPTIONS)})")
    data = line.get("data")
    if not isinstance(data, str) or not data:
        return Job(name, error=f"{where}: data {data!r}, expected the path of the user's JSON Lines file")
    opts = {k: line[k] for k in OPTIONS if k in line}
    if "layers" in opts:
        layers = opts["layers"]
        layers = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
        if not isinstance(layers, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
            return Job(name, error=f"{where}: layers {opts['layers']!r}, expected a block index or a list of them")
        opts["layers"] = tuple(layers)
    try:
        config = replace(defaults, **opts)
    except (ReftError, TypeError) as e:
        return Job(name, error=f"{where}: {e}")
    return Job(name, base_dir / data, config)


# ---- the run ----------------------------------------------------------------------------
def train_many(base: str | os.PathLike[str], jobs: Sequence[Job], out_dir: str | os.PathLike[str], *,
               resume: bool = False, force: bool = False, device: str = "auto", kind: str | None = None,
               backbone: Any = None, prefix_cache_mb: int = DEFAULT_PREFIX_MB, progress: bool = True,
               on_patch: Callable[[Outcome, Path], None] | None = None) -> list[Outcome]:
    """Train every job; return each user's outcome (in the jobs' order).  Patches go to
    ``out_dir/NAME.reft``; ``on_patch(outcome, path)`` hears each one as it is written."""
    from .backbone import load_backbone, pick_device
    t0 = time.perf_counter()
    ready, outcomes = plan(base, jobs, out_dir, resume=resume, force=force)
    if ready:
        device = pick_device(device) if backbone is None else backbone.device
        _say(progress, f"{len(ready)} users to train ({len(outcomes)} not: see the summary), on {device}")
        bb = backbone or load_backbone(base, kind, device=device)
        for o in _train(bb, base, ready, Path(out_dir), resume, prefix_cache_mb, progress, t0, on_patch):
            outcomes[o.name] = o
    return [outcomes[j.name] for j in jobs]


def plan(base: str | os.PathLike[str], jobs: Sequence[Job], out_dir: str | os.PathLike[str], *,
         resume: bool = False, force: bool = False) -> tuple[list[Job], dict[str, Outcome]]:
    """The jobs that can train, and the outcomes of the others (failed: why; skipped: written
    before, on resume), from what can be checked without the backbone: a mistake costs a
    second, not a run.  Raises only for what concerns every user (the base, the folder)."""
    from edge_reft.fingerprint import base_model
    from .backbone import check_trainable
    from .entry import check_fits
    out_dir = Path(out_dir)
    if not Path(base).exists():
        raise ReftError(f"BASE {base}: no such file or folder")
    if not out_dir.is_dir():
        raise ReftError(f"--out-dir {out_dir}: no such folder (create it first)")
    model = base_model(base)
    if Path(base).is_file():
        check_trainable(Path(base), model.architecture)
    outcomes = {j.name: Outcome(j.name, "failed", error=j.error) for j in jobs if j.error}
    ready: list[Job] = []
    data_files = {j.data.resolve() for j in jobs if j.data}
    for j in (j for j in jobs if not j.error):
        out = out_dir / f"{j.name}.reft"
        try:
            if not j.data.is_file():
                raise ReftError(f"data {j.data}: no such file (expected the user's JSON Lines)")
            check_fits(base, model, j.config)
            check_output(out, [base, j.data], flag="output", force=force)
            if out.resolve() in data_files:
                raise ReftError(f"output {out}: is another user's data file; writing there would destroy it")
            ckpt = out.with_name(out.name + ".ckpt")
            if resume and done_before(out, j) and not ckpt.exists():
                outcomes[j.name] = Outcome(j.name, "skipped", str(out))
                continue
            if ckpt.exists() and not resume:
                raise ReftError(f"{ckpt}: a checkpoint of an earlier run is here; pass --resume to continue "
                                "it, or delete it to start afresh")
        except ReftError as e:
            outcomes[j.name] = Outcome(j.name, "failed", error=f"{j.name}: {e}")
            continue
        ready.append(j)
    return ready, outcomes


def done_before(out: Path, job: Job) -> bool:
    """Whether ``out`` is this job's patch already: made from the same data, with the same options."""
    from edge_reft.reftfile import load_patch
    if not out.is_file():
        return False
    try:
        prov = load_patch(out).provenance
    except ReftError:
        return False
    c = job.config
    want = {"data_sha256": sha256_file(job.data), "rank": c.rank, "positions": c.positions, "type": c.type,
            "seed": c.seed, "lr": c.lr, "batch_size": c.batch_size}
    return all(prov.get(k) == v for k, v in want.items()) and \
        (c.layers is None or prov.get("layers") == list(c.layers))


def _train(bb: Any, base: Any, jobs: list[Job], out_dir: Path, resume: bool, prefix_cache_mb: int,
           progress: bool, t0: float, on_patch: Callable | None) -> list[Outcome]:
    from tqdm import tqdm

    from edge_reft.runtime import prompter_for
    from . import fleet, prefix
    from .entry import load_examples, write_patch
    from .trainer import Trainer, _weight_caches, auto_weights_cache, prefix_weights

    outcomes: dict[str, Outcome] = {}
    trainers: list[Trainer] = []
    job_of: dict[int, Job] = {}
    prompter, close = prompter_for(base)
    try:
        for j in jobs:
            ckpt = out_dir / f"{j.name}.reft.ckpt"
            try:
                examples, config = load_examples(j.data, prompter, j.config, bb.base.n_layer)
                t = Trainer(bb.model, examples, config, bb.base.n_embd, checkpoint_dir=ckpt)
                if not (resume and t.load_checkpoint()):
                    t.save_checkpoint()  # step 0 on disk: an interrupt anywhere can be resumed
            except ReftError as e:
                outcomes[j.name] = Outcome(j.name, "failed", error=f"{j.name}: {e}")
                continue
            trainers.append(t)
            job_of[id(t)] = j
    finally:
        close()
    if not trainers:
        return list(outcomes.values())
    budget = auto_weights_cache(bb.model, min(t.first_layer for t in trainers))
    for c in _weight_caches(bb.model):
        c.budget = budget
    cache = prefix.PrefixCache(prefix_cache_mb << 20)
    n_examples = sum(len(t.examples) for t in trainers)
    _say(progress, f"{len(trainers)} users, {n_examples} examples; caching their prefixes")
    with tqdm(total=n_examples, desc="caching prefixes", unit="ex", disable=not progress, file=sys.stderr) as bar:
        offset = 0
        for first in sorted({t.first_layer for t in trainers}):
            group = [t for t in trainers if t.first_layer == first]
            examples, p0s, keys = [], [], []
            for t in group:
                examples += t.examples
                p0s += [t.reft.first_edited(len(e.prompt)) for e in t.examples]
                keys += range(offset, offset + len(t.examples))
                t.cache = prefix.Slice(cache, offset, len(t.examples))
                offset += len(t.examples)
            with prefix_weights(bb.model, group[0].config):
                prefix.build(bb.model, examples, first, p0s, cache, batch=FLEET_PREFIX_BATCH.get(str(bb.device), 8),
                             progress=bar.update, keys=keys)

    total = sum(t.total - t.step for t in trainers)
    done = [0]
    with tqdm(total=total, desc="training", unit="step", disable=not progress, file=sys.stderr) as bar:
        def on_step(t: Trainer, step: int, loss: float) -> None:
            bar.update(1)

        def on_done(t: Trainer) -> None:
            j = job_of[id(t)]
            out = out_dir / f"{j.name}.reft"
            t.keep_best()
            try:
                write_patch(t, j.data, out, out.with_name(out.name + ".ckpt"), bb, name=j.name, t0=t0)
                o = Outcome(j.name, "written", str(out), steps=t.step,
                            heldout_loss=min(t.val_losses) if t.val_losses else None)
                if on_patch:
                    on_patch(o, out)
            except (ReftError, OSError) as e:
                o = Outcome(j.name, "failed", error=f"{j.name}: {e}", steps=t.step)
            t.cache.drop()
            outcomes[j.name] = o
            done[0] += 1
            bar.set_postfix(users=f"{done[0]}/{len(trainers)}")
            if progress:
                stop = " (stopped early)" if t.stopped_early else ""
                bar.write(f"[train-many] {j.name}: {o.status} {o.out or o.error} after {t.step} steps{stop}",
                          file=sys.stderr)
        for t in [t for t in trainers if t.done]:  # resumed at their end: nothing left but the writing
            on_done(t)
        fleet.run([t for t in trainers if not t.done], on_step, on_done=on_done)
    cache.close()
    return list(outcomes.values())


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"[train-many] {msg}", file=sys.stderr, flush=True)


def write_report(path: str | os.PathLike[str], outcomes: Sequence[Outcome]) -> Path:
    """The outcomes as JSON (one object a user), written atomically."""
    rows = [{f.name: getattr(o, f.name) for f in fields(o)} for o in outcomes]
    return write_text(path, json.dumps(rows, indent=1) + "\n")

