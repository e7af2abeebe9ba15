"""``edge-reft train-many --ray ADDRESS``: the users sharded over Ray actors, each actor one
loaded backbone training its shard as one fleet (``edge_reft.train.many``).

The driver (this process) checks every job first, exactly as a local run does (``many.plan``),
then sends each actor its users' options and data *bytes*: an actor needs no shared folder,
only the base model at the same path on its node.  An actor streams back each patch as soon
as it is written (a generator method), and the driver writes it to ``OUT_DIR/NAME.reft``
atomically, checked by loading it back.  An actor that dies (its process killed, its node
lost) loses only its unfinished users: they go, from step 0 with the same seeds, to a new
actor, up to ``retries`` times.  Checkpoints stay on the actors and go with them; ``--resume``
skips the users whose patches the driver has written.
"""
from __future__ import annotations

import os
import queue
import shutil
import sys
import tempfile
import threading
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

from edge_reft.errors import ReftError
from edge_reft.files import write_bytes
from edge_reft.train.many import DEFAULT_PREFIX_MB, Job, Outcome, plan
from .serve.raycluster import connected, ray


class FleetActor:
    """One loaded backbone; trains shards of users (``train``), streaming each patch back."""

    def __init__(self, base: str, kind: str | None, device: str, threads: int):
        import torch
        torch.set_num_threads(threads)
        from edge_reft.train.backbone import load_backbone
        self.base = base
        self.bb = load_backbone(base, kind, device=device)

    def pid(self) -> int:
        return os.getpid()

    def train(self, jobs: list[dict], prefix_cache_mb: int) -> Iterator[tuple[dict, bytes | None]]:
        """Yields (outcome, patch bytes or None) per user, each as soon as it is known."""
        from edge_reft.train.many import train_many
        from edge_reft.train.trainer import TrainConfig
        work = Path(tempfile.mkdtemp(prefix="edge-reft-fleet-"))
        try:
            local = []
            for i, j in enumerate(jobs):  # each data file keeps its name: the provenance records it
                (work / str(i)).mkdir()
                data = work / str(i) / j["data_name"]
                data.write_bytes(j["data"])
                config = TrainConfig(**{**j["config"], "layers": _tuple(j["config"]["layers"])})
                local.append(Job(j["name"], data, config))
            (work / "out").mkdir()
            events: queue.Queue = queue.Queue()

            def run() -> None:
                try:
                    outcomes = train_many(self.base, local, work / "out", backbone=self.bb, progress=False,
                                          prefix_cache_mb=prefix_cache_mb,
                                          on_patch=lambda o, path: events.put((asdict(o), path.read_bytes())))
                    for o in outcomes:
                        if o.status != "written":
                            events.put((asdict(o), None))
                except BaseException as e:  # noqa: BLE001 - reported per user, the actor lives on
                    for j in local:
                        events.put((asdict(Outcome(j.name, "failed", error=f"{j.name}: {type(e).__name__}: {e}")),
                                    None))
                finally:
                    events.put(None)
            threading.Thread(target=run, daemon=True).start()
            while (item := events.get()) is not None:
                yield item
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _tuple(layers: Any) -> Any:
    return tuple(layers) if layers is not None else None


def _payload(job: Job) -> dict:
    return {"name": job.name, "data_name": job.data.name, "data": job.data.read_bytes(),
            "config": asdict(job.config)}


def train_many_ray(address: str, base: str | os.PathLike[str], jobs: Sequence[Job], out_dir: str | os.PathLike[str],
                   *, actors: int = 2, cpus: float = 1, gpus: float = 0, retries: int = 2, resume: bool = False,
                   force: bool = False, device: str = "auto", kind: str | None = None,
                   prefix_cache_mb: int = DEFAULT_PREFIX_MB, progress: bool = True) -> list[Outcome]:
    """``train_many`` over ``actors`` Ray actors of the cluster at ``address`` (``local``: one on
    127.0.0.1 started here)."""
    from edge_reft.reftfile import load_patch
    out_dir = Path(out_dir)
    ready, outcomes = plan(base, jobs, out_dir, resume=resume, force=force)
    if not ready:
        return [outcomes[j.name] for j in jobs]
    payload = {j.name: _payload(j) for j in ready}
    base = os.path.abspath(base)
    say = (lambda m: print(f"[train-many] {m}", file=sys.stderr, flush=True)) if progress else (lambda m: None)
    events: queue.Queue = queue.Queue()
    remote = ray.remote(FleetActor)

    def launch(names: list[str]) -> None:
        actor = remote.options(num_cpus=cpus, num_gpus=gpus).remote(base, kind, device, max(1, int(cpus)))

        def consume() -> None:
            left = list(names)
            try:
                for ref in actor.train.remote([payload[n] for n in names], prefix_cache_mb):
                    outcome, data = ray.get(ref)
                    left.remove(outcome["name"])
                    events.put(("user", outcome, data))
                events.put(("end", actor, []))
            except Exception as e:  # noqa: BLE001 - the actor is lost (killed, out of memory, node gone)
                events.put(("lost", actor, (left, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")))
        threading.Thread(target=consume, daemon=True).start()

    names = [j.name for j in ready]
    n = max(1, min(actors, len(names)))
    with connected(address, quiet=not progress) as own:
        say(f"{len(names)} users over {n} actors ({'a local cluster on 127.0.0.1' if own else address})")
        for k in range(n):
            launch(names[k::n])
        running, done = n, 0
        while running:
            kind_, a, item = events.get()
            if kind_ == "user":
                o = Outcome(**a)
                if item is not None:
                    path = out_dir / f"{o.name}.reft"
                    try:
                        write_bytes(path, item)
                        load_patch(path)
                        o = replace(o, out=str(path))
                    except (ReftError, OSError) as e:
                        o = replace(o, status="failed", error=f"{o.name}: {e}", out="")
                outcomes[o.name] = o
                done += 1
                say(f"{o.name}: {o.status} {o.out or o.error} ({done}/{len(names)})")
            elif kind_ == "end":
                running -= 1
                ray.kill(a)
            else:
                left, why = item
                running -= 1
                with_retry = retries > 0 and left
                say(f"an actor was lost ({why}); {len(left)} of its users "
                    + ("go to a new actor" if with_retry else "fail"))
                if with_retry:
                    retries -= 1
                    running += 1
                    launch(left)
                else:
                    for name in left:
                        outcomes[name] = Outcome(name, "failed", error=f"{name}: its Ray actor was lost ({why})")
    return [outcomes[j.name] for j in jobs]
