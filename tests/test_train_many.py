"""Fleet training (issue 20): many users' patches in one pass over the real SmolLM2 Q4_1 backbone.

Each user's patch from the fleet must be the patch that user gets alone; a wrong job fails
alone; patches land atomically; interrupt and --resume work per user.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from edge_reft.dataset import encode, read_jsonl
from edge_reft.errors import ReftError
from edge_reft.reftfile import load_patch
from edge_reft.runtime import prompter_for
from edge_reft.tasks import boolq_records, sst2_records, write_jsonl
from edge_reft.train import TrainConfig, Trainer, load_backbone, train
from edge_reft.train import fleet
from edge_reft.train.many import Job, read_jobs, train_many, write_report

TOL = 2e-5  # float32 round-off between batches of other shapes (measured: ~8e-6)


@pytest.fixture(scope="module")
def backbone(smol_q4):
    return load_backbone(smol_q4)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("fleet")
    sst, bq = sst2_records("train", 40), boolq_records("train", 12)
    return {"a": write_jsonl(sst[:12], d / "a.jsonl"), "b": write_jsonl(bq, d / "b.jsonl"),
            "c": write_jsonl(sst[12:24], d / "c.jsonl"), "d": write_jsonl(sst[24:40], d / "d.jsonl")}


def _examples(smol_q4, path):
    prompter, close = prompter_for(smol_q4)
    try:
        return encode(read_jsonl(path), prompter)
    finally:
        close()


# users that differ in everything a fleet must keep apart: data, seed, layers (so the lowest
# block: two groups), rank, positions (row widths 3 vs 100+), type, batch size, epochs, holdout
USERS = {
    "a": TrainConfig(layers=(15,), rank=4, positions="l1", epochs=2, batch_size=4, seed=0, holdout=0),
    "b": TrainConfig(layers=(9, 20), rank=2, positions="f1+l1", type="direft", epochs=1, batch_size=3, seed=1,
                     holdout=0),
    "c": TrainConfig(layers=(15,), rank=4, positions="l1", epochs=3, batch_size=4, seed=2, holdout=0),
    "d": TrainConfig(layers=(15, 22), rank=3, positions="f0+l2", type="nodireft", epochs=4, batch_size=4, seed=3,
                     holdout=4),
}


def _trainer(backbone, smol_q4, data, name):
    return Trainer(backbone.model, _examples(smol_q4, data[name]), USERS[name], 576)


def test_each_users_patch_in_a_fleet_is_its_patch_alone(backbone, smol_q4, data):
    alone = {}
    for name in USERS:
        t = _trainer(backbone, smol_q4, data, name)
        t.prepare()
        t.run()
        alone[name] = t
    together = {name: _trainer(backbone, smol_q4, data, name) for name in USERS}
    for t in together.values():
        t.prepare()
    done = []
    fleet.run(list(together.values()), on_done=lambda t: done.append(t))
    assert len(done) == 4
    assert [t.step for t in done] == sorted(t.step for t in done)  # each written as soon as it ends
    for name in USERS:
        a, f = alone[name], together[name]
        assert f.step == a.step and f.stopped_early == a.stopped_early, name
        assert np.allclose(f.losses, a.losses, rtol=1e-5, atol=1e-6), (name, f.losses, a.losses)
        assert np.allclose(f.val_losses, a.val_losses, rtol=1e-5), name
        for x, y in zip(f.reft.parameters(), a.reft.parameters()):
            assert float((x - y).detach().abs().max()) < TOL, name
        moved = max(float((p - q).detach().abs().max()) for p, q in
                    zip(f.reft.parameters(), Trainer(backbone.model, f.examples, USERS[name], 576).reft.parameters()))
        assert moved > 100 * TOL, name  # the comparison is not between two untrained patches


def test_a_fleets_chunks_keep_blocks_and_lengths_apart(backbone, smol_q4, data):
    ts = [_trainer(backbone, smol_q4, data, n) for n in USERS]
    parts = [(t, t.batches()[0]) for t in ts]
    got = fleet.chunks(parts)
    together = [sorted(id(t) for t, _ in c) for c, _ in got]
    a, b, c, _ = ts
    assert [id(b)] in together  # block 9, 100-token rows: alone
    assert any(id(a) in g and id(c) in g for g in together)  # l1 at block 15, both: together
    for chunk, recompute in got:
        assert len({t.first_layer for t, _ in chunk}) == 1 and recompute is False


def test_train_many_writes_each_user_and_fails_only_the_bad_ones(backbone, smol_q4, data, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "hi", "response": "hello"}\n{"prompt": 3}\n')
    jobs_file = tmp_path / "jobs.jsonl"
    lines = [{"name": "alice", "data": str(data["a"]), "seed": 0},
             {"name": "carol", "data": str(data["c"]), "seed": 2, "epochs": 3},
             {"name": "bad-data", "data": "bad.jsonl"},
             {"name": "bad-rank", "data": str(data["a"]), "rank": 0},
             {"name": "bad-layer", "data": str(data["a"]), "layers": [30]},
             {"name": "no-data", "data": "missing.jsonl"},
             {"name": "typo", "data": str(data["a"]), "learning_rate": 0.1}]
    jobs_file.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    defaults = TrainConfig(layers=(15,), positions="l1", epochs=2, batch_size=4, holdout=0)
    jobs = read_jobs(jobs_file, defaults)
    out = tmp_path / "out"
    out.mkdir()
    heard = []
    outcomes = {o.name: o for o in train_many(smol_q4, jobs, out, backbone=backbone, progress=False,
                                               on_patch=lambda o, p: heard.append((o.name, p.exists())))}
    assert sorted(heard) == [("alice", True), ("carol", True)]
    assert {n for n, o in outcomes.items() if o.status == "written"} == {"alice", "carol"}
    why = {n: o.error for n, o in outcomes.items() if o.status == "failed"}
    assert "line 2" in why["bad-data"] and "bad.jsonl" in why["bad-data"]
    assert "rank: 0" in why["bad-rank"] and "block 30 does not exist" in why["bad-layer"]
    assert "missing.jsonl: no such file" in why["no-data"] and "'learning_rate'" in why["typo"]
    assert sorted(p.name for p in out.iterdir()) == ["alice.reft", "carol.reft"]  # no debris
    alone = train(smol_q4, data["a"], tmp_path / "alice-alone.reft", defaults, backbone=backbone, progress=False)
    fleet_patch = load_patch(out / "alice.reft")
    assert fleet_patch.provenance["data_sha256"] == alone.provenance["data_sha256"]
    assert fleet_patch.provenance["steps"] == alone.provenance["steps"] == 6
    for x, y in zip(fleet_patch.interventions, alone.interventions):
        for k in ("rotate", "weight", "bias"):
            assert np.abs(getattr(x, k) - getattr(y, k)).max() < TOL
    report = write_report(out / "train-many.json", list(outcomes.values()))
    assert {r["name"]: r["status"] for r in json.loads(report.read_text())}["bad-data"] == "failed"


def test_interrupted_fleet_resumes_per_user(backbone, smol_q4, data, tmp_path, monkeypatch):
    jobs = [Job("a", data["a"], USERS["a"]), Job("c", data["c"], USERS["c"])]
    straight = tmp_path / "straight"
    straight.mkdir()
    train_many(smol_q4, jobs, straight, backbone=backbone, progress=False)
    out = tmp_path / "out"
    out.mkdir()
    real, calls = fleet.step, []

    def interrupted(parts):
        calls.append(1)
        if len(calls) == 7:  # a has 6 steps: written; c (9 steps) is mid-way
            raise KeyboardInterrupt
        return real(parts)
    monkeypatch.setattr(fleet, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_many(smol_q4, jobs, out, backbone=backbone, progress=False)
    monkeypatch.setattr(fleet, "step", real)
    assert (out / "a.reft").exists() and not (out / "a.reft.ckpt").exists()
    assert json.loads((out / "c.reft.ckpt" / "state.json").read_text())["step"] == 6
    refused = {o.name: o for o in train_many(smol_q4, [jobs[1]], out, backbone=backbone, progress=False)}
    assert refused["c"].status == "failed" and "pass --resume" in refused["c"].error  # its checkpoint stays
    again = {o.name: o for o in train_many(smol_q4, jobs, out, backbone=backbone, progress=False, resume=True)}
    assert again["a"].status == "skipped" and again["c"].status == "written"
    for name in ("a", "c"):
        x, y = load_patch(out / f"{name}.reft"), load_patch(straight / f"{name}.reft")
        for p, q in zip(x.interventions, y.interventions):  # the prefixes were cached in other batches
            assert np.abs(p.rotate - q.rotate).max() < TOL and np.abs(p.bias - q.bias).max() < TOL


def test_jobs_are_read_strictly(tmp_path):
    defaults = TrainConfig(layers=(15,))
    f = tmp_path / "jobs.jsonl"
    f.write_text("\n".join([
        '{"name": "ok", "data": "ok.jsonl", "layers": 3, "rank": 2}',
        'not json',
        '[1, 2]',
        '{"name": "../evil", "data": "x.jsonl"}',
        '{"name": "nodata"}',
        '{"name": "badlayers", "data": "x.jsonl", "layers": "abc"}',
        '{"name": "boollayer", "data": "x.jsonl", "layers": true}',
        '{"name": "badpos", "data": "x.jsonl", "positions": "middle"}',
        '{"name": "badtype", "data": "x.jsonl", "type": "consreft"}',
        '', '   ',
    ]) + "\n")
    jobs = {j.name: j for j in read_jobs(f, defaults)}
    ok = jobs.pop("ok")
    assert ok.error is None and ok.config.layers == (3,) and ok.config.rank == 2 and ok.data == tmp_path / "ok.jsonl"
    errors = {n: j.error for n, j in jobs.items()}
    assert any("not a JSON object" in e and ":2:" in e for e in errors.values())
    assert any("expected a JSON object" in e for e in errors.values())
    assert any("'../evil'" in e for e in errors.values())
    assert "data None" in errors["nodata"] and "layers 'abc'" in errors["badlayers"]
    assert "layers True" in errors["boollayer"] and "middle" in errors["badpos"]
    assert "consreft" in errors["badtype"]
    f.write_text('{"name": "x", "data": "a.jsonl"}\n{"name": "X", "data": "b.jsonl"}\n')
    with pytest.raises(ReftError, match="more than one job"):
        read_jobs(f, defaults)
    f.write_text("\n\n")
    with pytest.raises(ReftError, match="no jobs"):
        read_jobs(f, defaults)
    with pytest.raises(ReftError, match="no such file or folder"):
        read_jobs(tmp_path / "nope", defaults)
    folder = tmp_path / "users"
    folder.mkdir()
    (folder / "ann.jsonl").write_text("")
    (folder / "ann.json").write_text('{"seed": 5, "positions": "l2"}')
    (folder / "ben.jsonl").write_text("")
    (folder / "ben.json").write_text('{"data": "elsewhere.jsonl"}')
    (folder / "cy.jsonl").write_text("")
    (folder / "cy.json").write_text("{oops")
    got = {j.name: j for j in read_jobs(folder, defaults)}
    assert got["ann"].config.seed == 5 and got["ann"].config.positions == "l2" and got["ann"].error is None
    assert "name and data come from the file name" in got["ben"].error and "not readable JSON" in got["cy"].error


def test_cli_reports_every_user_and_exits_1_on_a_failure(smol_q4, data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "users").mkdir()
    for name in ("u1", "u2"):
        (tmp_path / "users" / f"{name}.jsonl").write_bytes(data["a"].read_bytes())
    (tmp_path / "users" / "u3.jsonl").write_text("{}\n")
    (out / "u2.reft").mkdir()  # a folder where u2's patch would go: never replaced
    (out / "u2.reft" / "notes.txt").write_text("the user's own notes")
    r = subprocess.run([sys.executable, "-m", "edge_reft", "train-many", str(smol_q4), "--jobs",
                        str(tmp_path / "users"), "--out-dir", str(out), "--layers", "15", "--positions", "l1",
                        "--max-steps", "1", "--holdout", "0", "--quiet"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stderr
    report = {x["name"]: x for x in json.loads((out / "train-many.json").read_text())}
    assert report["u1"]["status"] == "written" and load_patch(out / "u1.reft").provenance["steps"] == 1
    assert report["u2"]["status"] == "failed" and "is a folder" in report["u2"]["error"]
    assert (out / "u2.reft" / "notes.txt").read_text() == "the user's own notes"
    assert report["u3"]["status"] == "failed" and "u3.jsonl" in report["u3"]["error"]
    assert "1 of 3 users ok; 2 failed" in r.stderr
    r = subprocess.run([sys.executable, "-m", "edge_reft", "train-many", str(tmp_path / "none.gguf"), "--jobs",
                        str(tmp_path / "users"), "--out-dir", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "none.gguf: no such" in r.stderr, r.stderr
