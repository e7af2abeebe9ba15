"""``edge-reft train-many BASE --jobs JOBS --out-dir DIR``: every user's patch in one run.

JOBS is a JSON Lines file, one user a line ({"name": "alice", "data": "alice.jsonl",
"seed": 3, ...}: data relative to the file, any train option per user), or a folder of
NAME.jsonl data files (options in NAME.json).  The flags below are every user's defaults.
Users train together over one loaded backbone, each exactly as `edge-reft train` would
train it alone; each patch lands in DIR/NAME.reft as soon as it is done; a user whose job
or data is wrong fails alone.  DIR/train-many.json reports every user's outcome.
"""
from __future__ import annotations

import argparse
import sys


def parser() -> argparse.ArgumentParser:
    from edge_reft.train.many import DEFAULT_PREFIX_MB

    from .common import add_model, verb_parser
    from .train import add_backbone, add_recipe
    ap = verb_parser("train-many", __doc__, "edge-reft train-many -m model.gguf --jobs users.jsonl --out-dir patches/")
    add_model(ap, "the .gguf every user's patch trains on (or an HF model folder, NF4)", "base")
    ap.add_argument("--jobs", required=True, help="a JSON Lines file of jobs, or a folder of NAME.jsonl data files")
    ap.add_argument("--out-dir", required=True, help="where NAME.reft, NAME.reft.ckpt/ and train-many.json go")
    add_recipe(ap)
    ap.add_argument("--resume", action="store_true",
                    help="continue each user's checkpoint; skip users whose patch is written from the same "
                         "data and options")
    add_backbone(ap)
    ap.add_argument("--prefix-cache-mb", type=int, default=DEFAULT_PREFIX_MB,
                    help=f"MiB of all users' cached prefixes kept in memory; the rest go to disk "
                         f"(default {DEFAULT_PREFIX_MB})")
    ap.add_argument("--ray", default=None, metavar="ADDRESS",
                    help="shard the users over Ray actors of this cluster (host:port, 'auto', or 'local' "
                         "for a cluster on 127.0.0.1 started here); needs the [ray] extra")
    ap.add_argument("--actors", type=int, default=2, help="with --ray: actors, each with a loaded backbone")
    ap.add_argument("--actor-cpus", type=float, default=1, help="with --ray: CPUs each actor reserves")
    ap.add_argument("--actor-gpus", type=float, default=0, help="with --ray: GPUs each actor reserves")
    ap.add_argument("--retries", type=int, default=2, help="with --ray: replacement actors after failures")
    ap.add_argument("--force", action="store_true", help="replace existing outputs that are not .reft files")
    ap.add_argument("--quiet", action="store_true", help="no progress output")
    return ap


def main(argv: list[str]) -> int:
    a = parser().parse_args(argv)
    from pathlib import Path

    from edge_reft.errors import ReftError
    from edge_reft.train.many import read_jobs, train_many, write_report

    from .common import model_of
    from .train import config_of
    a.base = model_of(a, "base")
    if a.prefix_cache_mb < 0:
        raise ReftError(f"--prefix-cache-mb {a.prefix_cache_mb}: expected MiB >= 0")
    jobs = read_jobs(a.jobs, config_of(a, a.base))
    out_dir = Path(a.out_dir)
    try:
        if a.ray:
            from edge_reft.services.fleet_ray import train_many_ray
            if a.actors < 1 or a.retries < 0:
                raise ReftError(f"--actors {a.actors} / --retries {a.retries}: expected >= 1 / >= 0")
            outcomes = train_many_ray(a.ray, a.base, jobs, out_dir, actors=a.actors, cpus=a.actor_cpus,
                                      gpus=a.actor_gpus, retries=a.retries, resume=a.resume, force=a.force,
                                      device=a.device, kind=a.backbone, prefix_cache_mb=a.prefix_cache_mb,
                                      progress=not a.quiet)
        else:
            outcomes = train_many(a.base, jobs, out_dir, resume=a.resume, force=a.force, device=a.device,
                                  kind=a.backbone, prefix_cache_mb=a.prefix_cache_mb, progress=not a.quiet)
    except KeyboardInterrupt:
        print("\nedge-reft train-many: interrupted; written patches stay, unfinished users are "
              "checkpointed: continue with --resume (same flags)", file=sys.stderr)
        return 130
    write_report(out_dir / "train-many.json", outcomes)
    width = max(len(o.name) for o in outcomes)
    for o in outcomes:
        detail = o.out if o.status != "failed" else o.error
        print(f"{o.name:<{width}}  {o.status:<7}  {detail}")
    failed = [o for o in outcomes if o.status == "failed"]
    print(f"\n{len(outcomes) - len(failed)} of {len(outcomes)} users ok"
          + (f"; {len(failed)} failed (see above, or {out_dir / 'train-many.json'})" if failed else ""),
          file=sys.stderr)
    return 1 if failed else 0
