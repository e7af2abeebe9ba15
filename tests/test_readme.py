"""README.md's commands, extracted and run as written, so the README cannot drift.

Every ``edge-reft`` and ``curl`` line of README's code blocks is a case (lines
ending in ``\\`` joined, ``# comments`` dropped; ``[--flag x]`` marks an optional
flag and is run without it; the pipeline diagram is not a command).  They run in
a folder that holds what the README names: ``model.gguf`` (the embedded
SmolLM2), patches made for it, small real data sets, a pyreft folder, a
``patches/`` folder and a running server for ``curl``.  The two install commands
at the top are what CI itself runs.  Each must exit 0 with its documented output
shape; ONNX export and default-recipe training take minutes, so those cases are
marked slow (CI runs them after the default suite).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# minutes each: ONNX export; training with the default recipe (tests/test_train.py covers the CLI fast);
# a local Ray cluster
SLOW = ("export-onnx", "smol-onnx", "onnx_dir", "edge-reft train ", "--ray")


def commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    out = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        if "──►" in block or "scripts/install.sh" in block:
            continue  # the diagram; the install commands (CI runs them)
        lines = block.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i].strip()
            while line.endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line[:-1].rstrip() + " " + lines[i].strip()
            i += 1
            if re.match(r"(edge-reft|curl) ", line):
                out.append(re.sub(r"\s*\[--[^\]]*\]", "", line))
    return out


COMMANDS = commands()


def test_the_readme_has_commands_to_run():
    verbs = {shlex.split(c, comments=True)[1] for c in COMMANDS if c.startswith("edge-reft")}
    assert {"run", "inspect", "train", "eval", "serve", "pull", "convert", "export-onnx", "cache"} <= verbs


@pytest.fixture(scope="module")
def place(tmp_path_factory, smol_q4):
    """A folder holding what the README's commands name."""
    from edge_reft.converters.pyreft import to_pyreft
    from edge_reft.fingerprint import from_gguf
    from edge_reft.files import sha256_file
    from edge_reft.patch import random_patch
    from edge_reft.reftfile import save_patch
    from edge_reft.tasks import sst2_records, write_jsonl
    d = tmp_path_factory.mktemp("readme")
    for name in ("model.gguf", smol_q4.name):
        os.symlink(smol_q4, d / name)
    base = from_gguf(smol_q4)
    for i, name in enumerate(("user", "a", "b", "me")):
        save_patch(random_patch(base, [(10 + i, "l1", 2)], seed=i), d / f"{name}.reft")
    (d / "patches").mkdir()
    save_patch(random_patch(base, [(15, "l1", 4)], scale=8.0, seed=9), d / "patches" / "alice.reft")
    write_jsonl(sst2_records("train", 8), d / "notes.jsonl")
    write_jsonl(sst2_records("test", 6), d / "held_out.jsonl")
    to_pyreft(random_patch(base, [(15, "f1", 2), (15, "l1", 2)], seed=5), d / "my_reft_dir")  # untied f1+l1
    # train-many's jobs: a file of two users and a folder of one, each a few steps on notes.jsonl
    jobs = [{"name": n, "data": "notes.jsonl", "seed": i, "max_steps": 2} for i, n in enumerate(("bob", "carol"))]
    (d / "users.jsonl").write_text("".join(json.dumps(j) + "\n" for j in jobs))
    (d / "users").mkdir()
    write_jsonl(sst2_records("train", 8), d / "users" / "dan.jsonl")
    (d / "users" / "dan.json").write_text(json.dumps({"max_steps": 2, "positions": "f1+l1"}))
    return {"dir": d, "sha": sha256_file(d / "patches" / "alice.reft")}


@pytest.fixture(scope="module")
def server(place):
    """README's serve command, running, for the curl lines (port 8080 swapped for a free one)."""
    serve = next(c for c in COMMANDS if c.startswith("edge-reft serve") and "--patches ./patches" in c)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = argv_of(serve, place) + ["--port", str(port)]
    proc = subprocess.Popen(argv, cwd=place["dir"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    import httpx
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.time() < deadline, f"serve did not start: {proc.stderr.read()}"
        time.sleep(0.2)
    yield port
    proc.terminate()
    proc.wait(timeout=30)


def argv_of(command: str, place: dict) -> list[str]:
    words = shlex.split(command.replace("<hex>", place["sha"]), comments=True)
    words = [str(place["dir"] / "patches" / "alice.reft") if w.startswith("https://example.org/") else w
             for w in words]
    if words[0] == "edge-reft":
        return [sys.executable, "-m", "edge_reft", *words[1:]]
    return words


@pytest.mark.parametrize("command", [pytest.param(c, marks=pytest.mark.slow) if any(s in c for s in SLOW)
                                     else c for c in COMMANDS])
def test_readme_command_runs_as_written(command, place, request):
    argv = argv_of(command, place)
    if argv[0] == "curl":
        port = request.getfixturevalue("server")
        argv = [a.replace("localhost:8080", f"127.0.0.1:{port}") for a in argv]
        if not shutil_which("curl"):
            pytest.skip("curl is not installed on this machine")
    elif "--ray" in argv:
        pytest.importorskip("ray", reason="the [ray] extra is not installed")
    if "serve" in argv[3:4]:
        request.getfixturevalue("server")  # the server fixture runs this very command
        return
    stdin = "Hi\n/bye\n" if "--chat" in argv else None
    r = subprocess.run(argv, cwd=place["dir"], capture_output=True, text=True, input=stdin, timeout=1500)
    assert r.returncode == 0, f"{command}\n{r.stderr[-3000:]}"
    if argv[0] == "curl":
        assert json.loads(r.stdout)["choices"][0]["message"]["content"] is not None
    elif "--json" in argv:
        json.loads(r.stdout)
    else:
        assert r.stdout.strip() or r.stderr.strip()


def shutil_which(name: str) -> str | None:
    import shutil
    return shutil.which(name)
