"""No writer destroys an input (issue 14, item 5): every output flag of train, convert and pull
is pointed at each input, and at a file of another kind, through the real command line; each
is refused in seconds and the victim keeps its bytes.  Plus the atomic-write helper itself."""
from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from edge_reft.errors import ReftError
from edge_reft.files import atomic_path, sha256_file, write_bytes
from edge_reft.fingerprint import from_gguf
from edge_reft.outputs import check_output
from edge_reft.patch import random_patch
from edge_reft.reftfile import save_patch


@pytest.fixture
def files(smol_q4, tmp_path) -> dict[str, str]:
    (tmp_path / "m.gguf").symlink_to(smol_q4)  # the "model": replacing it would only replace the link
    (tmp_path / "d.jsonl").write_text('{"prompt": "2+2?", "response": "4"}\n')
    (tmp_path / "e.jsonl").write_text('{"prompt": "3+3?", "response": "6"}\n')
    (tmp_path / "notes.txt").write_text("my notes\n")
    (tmp_path / "pyreft").mkdir()
    (tmp_path / "pyreft" / "config.json").write_text("{}")
    save_patch(random_patch(from_gguf(smol_q4), [(15, "l1", 2)], seed=3), tmp_path / "p.reft")
    cache = tmp_path / "cache" / "patches"
    cache.mkdir(parents=True)
    (cache / "alice.reft").write_bytes((tmp_path / "p.reft").read_bytes())
    return {k: str(tmp_path / v) for k, v in [("tmp", ""), ("model", "m.gguf"), ("data", "d.jsonl"),
                                                ("eval", "e.jsonl"), ("notes", "notes.txt"),
                                                ("pyreft", "pyreft"), ("patch", "p.reft"),
                                                ("cached", "cache/patches/alice.reft")]}


TRAIN = ["train", "{model}", "--data", "{data}", "--eval-data", "{eval}", "--out"]
CONVERT = ["convert", "pyreft", "{pyreft}", "--base", "{model}", "--positions", "l1", "--out"]
# (id, argv, the file that must survive, fragment of the one error line)
CASES = [
    ("train-out-is-the-model", TRAIN + ["{model}"], "model", "is the input"),
    ("train-out-is-the-data", TRAIN + ["{data}"], "data", "is the input"),
    ("train-out-is-the-eval-data", TRAIN + ["{eval}"], "eval", "is the input"),
    ("train-out-is-another-file", TRAIN + ["{notes}"], "notes", "not a .reft file; pass --force"),
    ("convert-out-is-the-base", CONVERT + ["{model}"], "model", "is the input"),
    ("convert-out-is-in-the-checkpoint", CONVERT + ["{pyreft}/config.json"], "pyreft/config.json",
     "not a .reft file"),
    ("convert-out-is-the-checkpoint", CONVERT + ["{pyreft}"], "pyreft/config.json", "is the input"),
    ("to-pyreft-out-holds-the-patch", ["convert", "to-pyreft", "{patch}", "--out", "{tmp}"], "patch", "not an empty folder"),
    ("pull-onto-its-own-source", ["pull", "{cached}", "--sha256", "0" * 64, "--name", "alice"], "cached",
     "is the input"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_outputs_never_replace_an_input(case, files, tmp_path):
    _, args, victim, fragment = case
    path = Path(files[victim] if victim in files else f"{files['tmp']}/{victim}")
    before = (os.lstat(path).st_mode, sha256_file(path) if not path.is_symlink() else os.readlink(path))
    r = subprocess.run([sys.executable, "-m", "edge_reft", *[a.format(**files) for a in args]],
                       capture_output=True, text=True, timeout=100,
                       env={**os.environ, "EDGE_REFT_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert fragment in r.stderr, r.stderr
    after = (os.lstat(path).st_mode, sha256_file(path) if not path.is_symlink() else os.readlink(path))
    assert after == before


def test_force_allows_another_kind_but_never_an_input(tmp_path):
    notes, data = tmp_path / "notes.txt", tmp_path / "d.jsonl"
    notes.write_text("x")
    data.write_text("y")
    assert check_output(notes, [data], force=True) == notes
    with pytest.raises(ReftError, match="is the input"):
        check_output(data, [data], force=True)
    with pytest.raises(ReftError, match="is a folder"):
        check_output(tmp_path, [])
    fifo = tmp_path / "f.reft"
    os.mkfifo(fifo)
    with pytest.raises(ReftError, match="not a regular file"):
        check_output(fifo, [], force=True)


def test_atomic_write_keeps_the_old_file_on_failure_and_follows_the_umask(tmp_path):
    target = tmp_path / "x.reft"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["x.reft"]
    old = os.umask(0o027)
    try:
        write_bytes(target, b"new")
    finally:
        os.umask(old)
    assert target.read_bytes() == b"new" and stat.S_IMODE(target.stat().st_mode) == 0o640
    assert sha256_file(target) == hashlib.sha256(b"new").hexdigest()


def test_locked_serializes_processes(tmp_path):
    """files.locked: a second process waits until the first lets go (flock; msvcrt on Windows)."""
    import subprocess
    import sys
    import time
    from edge_reft.files import locked
    lock, log = tmp_path / "x.lock", tmp_path / "log"
    child = ("import sys, time; from edge_reft.files import locked\n"
             "with locked(sys.argv[1]):\n    open(sys.argv[2], 'a').write('child\\n')\n")
    with locked(lock):
        p = subprocess.Popen([sys.executable, "-c", child, str(lock), str(log)])
        time.sleep(1.0)
        assert not log.exists()  # still waiting
        log.write_text("parent\n")
    assert p.wait(timeout=60) == 0
    assert log.read_text() == "parent\nchild\n"


def test_cache_verb_lists_and_clears_but_keeps_patches(tmp_path):
    import subprocess
    import sys
    (tmp_path / "hf" / "abc").mkdir(parents=True)
    (tmp_path / "hf" / "abc" / "model.safetensors").write_bytes(b"x" * 3 * 2**20)
    (tmp_path / "patches").mkdir()
    (tmp_path / "patches" / "alice.reft").write_bytes(b"p")
    (tmp_path / "llama-server" / "0.3.36-x").mkdir(parents=True)  # the serving benchmarks' build
    (tmp_path / "llama-server" / "0.3.36-x" / "llama-server").write_bytes(b"s" * 2**20)
    (tmp_path / "someone-elses").mkdir()  # a folder this version does not know: listed, never cleared
    (tmp_path / "someone-elses" / "keep").write_bytes(b"k" * 2**20)
    env = {**os.environ, "EDGE_REFT_CACHE": str(tmp_path)}
    run = lambda *a: subprocess.run([sys.executable, "-m", "edge_reft", "cache", *a], env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    listed = run().stdout
    assert "3.0 MiB  abc" in listed and "alice.reft" in listed
    assert "1.0 MiB  0.3.36-x" in listed and "someone-elses" in listed and "clear leaves it" in listed
    r = run("clear", "all")
    assert r.returncode == 0 and "cleared hf: 3.0 MiB" in r.stderr and "cleared llama-server: 1.0 MiB" in r.stderr
    assert not (tmp_path / "hf" / "abc").exists() and (tmp_path / "patches" / "alice.reft").exists()
    assert not (tmp_path / "llama-server" / "0.3.36-x").exists() and (tmp_path / "someone-elses" / "keep").exists()
    assert run("clear", "everything").returncode == 1
