"""Bad arguments on the real command line (issue 14, items 10 and 12): each gives exit code
1 or 2 and one line on stderr naming the problem, never a traceback, never a hang."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_reft.fingerprint import from_gguf
from edge_reft.patch import random_patch
from edge_reft.reftfile import save_patch


@pytest.fixture(scope="module")
def files(smol_q4, tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("abuse")
    (d / "d.jsonl").write_text('{"prompt": "2+2?", "response": "4"}\n' * 3)
    (d / "latin1.jsonl").write_bytes('{"prompt": "caf\xe9", "response": "x"}\n'.encode("latin-1"))
    os.mkfifo(d / "fifo.gguf")
    with open(smol_q4, "rb") as f:
        (d / "trunc.gguf").write_bytes(f.read(8 << 20))
    patch = save_patch(random_patch(from_gguf(smol_q4), [(15, "l1", 2)], seed=3), d / "p.reft")
    return {"model": str(smol_q4), "data": str(d / "d.jsonl"), "latin1": str(d / "latin1.jsonl"),
            "fifo": str(d / "fifo.gguf"), "trunc": str(d / "trunc.gguf"), "patch": str(patch),
            "missing": str(d / "nope.gguf"), "nodir": str(d / "no" / "such" / "x.reft"), "tmp": str(d)}


# (id, argv, exit code, a fragment the one error line must hold)
CASES = [
    ("run-seed-negative", ["run", "--seed", "-1", "-p", "Hi", "-n", "2"], 1, "seed: -1"),
    ("run-prompt-bad-utf8", ["run", "-p", b"\xffHi", "-n", "2"], 1, "-p: not valid UTF-8"),
    ("run-stop-bad-utf8", ["run", "-p", "Hi", "--stop", b"\xfe", "-n", "2"], 1, "--stop: not valid UTF-8"),
    ("run-seed-not-int", ["run", "--seed", "x"], 2, "--seed"),
    ("train-missing-base", ["train", "{missing}", "--data", "{data}", "--out", "{tmp}/u.reft"], 1,
     "no such file"),
    ("train-missing-data", ["train", "{model}", "--data", "{tmp}/none.jsonl", "--out", "{tmp}/u.reft"], 1,
     "--data"),
    ("train-rank-above-n-embd", ["train", "{model}", "--data", "{data}", "--out", "{tmp}/u.reft",
                                 "--rank", "100000"], 1, "--rank 100000"),
    ("train-layer-too-big", ["train", "{model}", "--data", "{data}", "--out", "{tmp}/u.reft",
                             "--layers", "30"], 1, "block 30"),
    ("train-out-missing-folder", ["train", "{model}", "--data", "{data}", "--out", "{nodir}"], 1,
     "does not exist"),
    ("convert-out-missing-folder", ["convert", "pyreft", "{tmp}", "--base", "{model}", "--positions", "l1",
                                    "--out", "{nodir}"], 1, "does not exist"),
    ("eval-limit-negative", ["eval", "{model}", "--patch", "{patch}", "--data", "{data}", "--limit", "-1"], 1,
     "--limit -1"),
    ("eval-limit-non-utf8", ["eval", "{model}", "--patch", "{patch}", "--data", "{latin1}", "--limit", "1"], 1,
     "not UTF-8"),
    ("inspect-fifo", ["inspect", "{fifo}"], 1, "not a regular file"),
    ("inspect-truncated-model", ["inspect", "{trunc}"], 1, "larger than the file"),
    ("inspect-missing", ["inspect", "{missing}"], 1, "cannot be read"),
    ("pull-bad-sha", ["pull", "{patch}", "--sha256", "xyz"], 1, "--sha256"),
    ("pull-name-newline", ["pull", "{patch}", "--sha256", "a" * 64, "--name", "evil\n"], 1, "plain patch name"),
]


def _argv(args: list, files: dict[str, str]) -> list:
    return [a if isinstance(a, bytes) else a.format(**files) for a in args]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_arguments_give_one_clear_line(case, files, tmp_path):
    _, args, code, fragment = case
    env = {**os.environ, "EDGE_REFT_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "edge_reft", *_argv(args, files)], capture_output=True,
                       timeout=100, env=env, stdin=subprocess.DEVNULL)
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == code, err
    assert "Traceback" not in err, err
    # one error line (a file's problems follow it as an indented list), or argparse's usage + one line
    lines = [x for x in err.splitlines() if x.strip() and not x.startswith(("usage:", " ", "[edge-reft]"))]
    assert len(lines) == 1, err
    assert fragment in lines[0] or fragment in err[err.index(lines[0]):], err
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*.part"))


@pytest.mark.timeout(120)
def test_a_tiny_temperature_samples_like_greedy():
    """--temp 1e-320 used to divide logits into inf and crash on NaN probabilities."""
    run = lambda *a: subprocess.run([sys.executable, "-m", "edge_reft", "run", "-p", "Name a colour.", "-n", "6",
                                     "--json", *a], capture_output=True, text=True, timeout=100)
    tiny, greedy = run("--temp", "1e-320", "--seed", "1"), run()
    assert tiny.returncode == 0 and "Traceback" not in tiny.stderr, tiny.stderr
    assert tiny.stdout.splitlines()[-1] == greedy.stdout.splitlines()[-1]


@pytest.mark.timeout(120)
def test_train_refusal_leaves_no_checkpoint_folder(files):
    out = Path(files["tmp"]) / "u.reft"
    subprocess.run([sys.executable, "-m", "edge_reft", "train", files["model"], "--data", files["data"],
                    "--out", str(out), "--rank", "100000"], capture_output=True, timeout=100)
    assert not out.exists() and not Path(f"{out}.ckpt").exists()
