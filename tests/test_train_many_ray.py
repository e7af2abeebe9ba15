"""train-many --ray on a real local Ray cluster (127.0.0.1, 2 actors): every patch written and
equal to the single-process fleet's; an actor killed mid-run: its users finish on a new one.

Needs the optional [ray] extra (skipped without it) and ~2 minutes: marked slow.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from edge_reft.reftfile import load_patch
from edge_reft.tasks import sst2_records, write_jsonl

pytestmark = pytest.mark.slow
pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

USERS = 16
RECIPE = ["--layers", "15", "--rank", "2", "--positions", "l1", "--batch-size", "4", "--epochs", "1",
          "--holdout", "0"]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    d = tmp_path_factory.mktemp("ray-fleet")
    recs = sst2_records("train", 8 + USERS)
    with open(d / "jobs.jsonl", "w") as f:
        for u in range(USERS):
            write_jsonl(recs[u:u + 8], d / f"u{u:02d}.jsonl")
            f.write(json.dumps({"name": f"u{u:02d}", "data": f"u{u:02d}.jsonl", "seed": u}) + "\n")
    return d / "jobs.jsonl"


def _train_many(smol_q4, jobs, out, *extra, wait=None):
    out.mkdir()
    cmd = [sys.executable, "-m", "edge_reft", "train-many", str(smol_q4), "--jobs", str(jobs), "--out-dir",
           str(out), *RECIPE, *extra]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        wait(p)
    stdout, stderr = p.communicate(timeout=900)
    return p.returncode, stdout, stderr


@pytest.fixture(scope="module")
def in_process(smol_q4, jobs, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "out"
    rc, _, err = _train_many(smol_q4, jobs, out, "--quiet")
    assert rc == 0, err
    return out


# Shards of 8 users train in other batch shapes than one fleet of 16: float32 round-off, which
# AdamW scales up where a gradient is ~0 (its step is lr x m / sqrt(v): ~lr x sign); seen: 3.0e-5
TOL = 1e-4


def _same(a, b):
    for x, y in zip(load_patch(a).interventions, load_patch(b).interventions):
        assert np.abs(x.rotate - y.rotate).max() < TOL and np.abs(x.weight - y.weight).max() < TOL \
            and np.abs(x.bias - y.bias).max() < TOL


def test_two_local_actors_write_every_patch_equal_to_one_process(smol_q4, jobs, in_process, tmp_path):
    rc, stdout, err = _train_many(smol_q4, jobs, tmp_path / "out", "--ray", "local", "--actors", "2")
    assert rc == 0, err
    assert "16 users over 2 actors (a local cluster on 127.0.0.1)" in err
    report = json.loads((tmp_path / "out" / "train-many.json").read_text())
    assert [r["status"] for r in report] == ["written"] * USERS
    for u in range(USERS):
        _same(tmp_path / "out" / f"u{u:02d}.reft", in_process / f"u{u:02d}.reft")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == \
        sorted([f"u{u:02d}.reft" for u in range(USERS)] + ["train-many.json"])  # nothing else, no checkpoints


def _actors() -> list:
    return [p for p in psutil.process_iter(["cmdline"])
            if any("FleetActor" in part for part in (p.info["cmdline"] or []))]


def test_a_killed_actors_users_finish_on_a_new_actor(smol_q4, jobs, in_process, tmp_path):
    out = tmp_path / "out"
    killed = []

    def kill_one_when_training(p):
        deadline = time.time() + 600
        while time.time() < deadline and p.poll() is None:
            busy = [a for a in _actors() if any("FleetActor.train" in part for part in a.cmdline())]
            if len(busy) == 2:  # both shards under way: kill one mid-shard
                time.sleep(3)
                busy[0].kill()
                killed.append(busy[0].pid)
                return
            time.sleep(0.5)
    rc, stdout, err = _train_many(smol_q4, jobs, out, "--ray", "local", "--actors", "2", wait=kill_one_when_training)
    assert killed, err
    assert rc == 0, err
    assert "an actor was lost" in err and "go to a new actor" in err
    for u in range(USERS):
        _same(out / f"u{u:02d}.reft", in_process / f"u{u:02d}.reft")


def test_ray_missing_or_plain_run_never_imports_ray(smol_q4, jobs, tmp_path):
    code = ("import sys; from edge_reft.services.cli import train_many; "
            "from edge_reft.train import many; assert 'ray' not in sys.modules, 'ray imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
