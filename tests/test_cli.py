"""The command line: verbs, exit codes, JSON output, and no torch on the run path."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edge_reft.patch import BaseModel, random_patch
from edge_reft.reftfile import save_patch
from hostile import CORPUS


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_reft", *args], capture_output=True, text=True,
                          input=stdin, timeout=300)


def test_help_and_unknown_verb():
    r = cli("--help")
    assert r.returncode == 0 and "run" in r.stdout and "inspect" in r.stdout
    r = cli("frobnicate")
    assert r.returncode == 2 and "unknown verb" in r.stderr


NO_TORCH = """
import sys
from edge_reft.services.cli import main
rc = main(sys.argv[1:])
bad = sorted(m for m in ("torch", "transformers", "gguf") if m in sys.modules)
print("IMPORTED:" + ",".join(bad))
sys.exit(rc)
"""


@pytest.mark.parametrize("args", [["inspect", "{model}"], ["run", "-p", "Hi", "-n", "3"], ["inspect", "{patch}"],
                                  ["demo", "-n", "4"]])
def test_run_and_inspect_never_import_torch(args, smol_q4, tmp_path):
    patch = save_patch(random_patch(BaseModel("llama", 576, 30, "ab" * 32), [(1, "l1", 2)]), tmp_path / "p.reft")
    argv = [a.format(model=smol_q4, patch=patch) for a in args]
    r = subprocess.run([sys.executable, "-c", NO_TORCH, *argv], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "IMPORTED:\n" in r.stdout, r.stdout


def test_import_is_light():
    """Importing the package (and reaching the Engine factory) loads neither torch nor llama.cpp."""
    r = subprocess.run([sys.executable, "-c", "import edge_reft, sys; edge_reft.Engine; "
                        "print('torch' in sys.modules, 'llama_cpp' in sys.modules)"],
                       capture_output=True, text=True, check=True)
    assert r.stdout.split() == ["False", "False"]


def test_inspect_model_json(smol_q4):
    r = cli("inspect", str(smol_q4), "--json")
    rec = json.loads(r.stdout)
    assert (rec["architecture"], rec["n_embd"], rec["n_layer"]) == ("llama", 576, 30)
    assert len(rec["fingerprint"]) == 64


@pytest.mark.parametrize("name", ["huge-array-43-bytes", "trunc-50pct", "nan-weight", "magic"])
def test_inspect_rejects_cleanly(tmp_path, name):
    p = tmp_path / f"{name}.reft"
    p.write_bytes(CORPUS[name][0]())
    r = cli("inspect", str(p))
    assert r.returncode == 1
    assert r.stderr.startswith("edge-reft inspect: error:") and "Traceback" not in r.stderr
    assert str(p) in r.stderr


def test_run_json_with_and_without_patch(smol_q4, tmp_path):
    from edge_reft.fingerprint import from_gguf
    patch = save_patch(random_patch(from_gguf(smol_q4), [(15, "l1", 4)], scale=8.0, seed=1),
                       tmp_path / "p.reft")
    plain = json.loads(cli("run", "-p", "Name a colour.", "-n", "12", "--json").stdout)
    patched = json.loads(cli("run", str(smol_q4), "--patch", str(patch), "-p", "Name a colour.",
                             "-n", "12", "--json").stdout)
    assert plain["prompt_tokens"] == patched["prompt_tokens"]
    assert plain["tokens"] != patched["tokens"] and len(patched["tokens"]) > 0
    raw = json.loads(cli("run", "--raw", "-p", "<|im_start|>user\nHi<|im_end|>\n", "-n", "1", "--json").stdout)
    assert raw["prompt_tokens"][0] == 1  # <|im_start|> parsed as the special token


def test_run_refuses_a_patch_for_another_model(tmp_path):
    patch = save_patch(random_patch(BaseModel("llama", 576, 30, "cd" * 32, "other"), [(2, "l1", 2)]),
                       tmp_path / "other.reft")
    r = cli("run", "--patch", str(patch), "-p", "Hi", "-n", "2")
    assert r.returncode == 1 and "--allow-mismatch" in r.stderr and "Traceback" not in r.stderr
    r = cli("run", "--patch", str(patch), "--allow-mismatch", "-p", "Hi", "-n", "2")
    assert r.returncode == 0


def test_chat_keeps_the_conversation():
    r = cli("run", "--chat", "-n", "8", stdin="Hello!\nWhat did I just say?\n\n")
    assert r.returncode == 0 and r.stdout.count("\n") >= 2


@pytest.mark.parametrize("args,named", [
    (["--providers", "CUDAExecutionProvider"], "--providers (a onnx option)"),
    (["--backend", "onnx", "--ngl", "99"], "--ngl (a llama.cpp option)"),
])
def test_a_backend_flag_the_chosen_backend_lacks_is_refused(args, named, smol_q4, tmp_path):
    """The flags come from the backend table; one for another backend is an error, never ignored."""
    folder = tmp_path / "onnx"
    folder.mkdir()
    model = str(folder) if "onnx" in args else str(smol_q4)
    r = cli("run", model, "-p", "Hi", "-n", "2", *args)
    assert r.returncode != 0 and named in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_help_verb_version_and_plain_help_text():
    r = cli("help", "run")
    assert r.returncode == 0 and "example:" in r.stdout and "(default: 128)" in r.stdout
    assert "``" not in r.stdout and "--repeat-penalty" in r.stdout
    assert cli("-V").stdout.startswith("edge-reft ")
    assert "int8" in cli("export-onnx", "--help").stdout
    for verb in ("train", "eval", "serve", "export-onnx"):
        assert "-m MODEL, --model MODEL" in cli(verb, "--help").stdout, verb


def test_model_flag_system_message_and_penalties(smol_q4):
    """-m is the positional model; --system goes through the template; penalties reach the
    sampler (a repeat penalty changes a greedy reply that repeats itself)."""
    base = ["-p", "Repeat the word 'yes' forever.", "-n", "24", "--json"]
    pos = json.loads(cli("run", str(smol_q4), *base).stdout.splitlines()[-1])
    flag = json.loads(cli("run", "-m", str(smol_q4), *base).stdout.splitlines()[-1])
    assert pos["tokens"] == flag["tokens"]
    sysm = json.loads(cli("run", "-m", str(smol_q4), *base, "--system", "You are a pirate.").stdout.splitlines()[-1])
    assert sysm["prompt_tokens"] != pos["prompt_tokens"]  # SmolLM2's default system line replaced
    pen = json.loads(cli("run", *base, "--repeat-penalty", "1.5").stdout.splitlines()[-1])
    assert pen["tokens"] != pos["tokens"]
    r = cli("run", "-m", str(smol_q4), "/elsewhere/other.gguf", "-p", "hi")
    assert r.returncode == 1 and "two models given" in r.stderr
    r = cli("run", *base, "--system", "x", "--raw")
    assert r.returncode == 1 and "--system" in r.stderr


def test_chat_goes_on_past_an_empty_line(smol_q4):
    r = cli("run", "--chat", "-n", "4", stdin="Hi\n\nName a fruit.\n/bye\nnever sent\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("> ") == 4  # Hi, the empty line, the fruit, /bye: "never sent" is not read


def test_the_same_patch_twice_is_warned(smol_q4, tmp_path):
    patch = save_patch(random_patch(BaseModel("llama", 576, 30, "ab" * 32), [(1, "l1", 2)]), tmp_path / "p.reft")
    r = cli("run", "-p", "Hi", "-n", "2", "--patch", str(patch), "--patch", str(patch), "--allow-mismatch")
    assert "is given 2 times" in r.stderr, r.stderr


@pytest.mark.parametrize("flags, line", [((), "1 worker of 8 slots"), (("--ngl", "99"), "2 workers of 8 slots"),
                                         (("--ngl", "99", "--workers", "1", "--slots", "4"), "1 worker of 4 slots")])
def test_serve_says_its_workers_two_by_default_with_layers_on_a_gpu(smol_q4, tmp_path, flags, line):
    """With layers on a GPU a batching worker waits on host work between decodes, so serve
    takes two unless told (on a CPU-only build --ngl places nothing and the engines still load)."""
    import socket
    import time
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "edge_reft", "serve", str(smol_q4), "--patches", str(tmp_path),
                             "--port", str(port), "--ctx", "256", *flags], stderr=subprocess.PIPE, text=True)
    try:
        deadline, err = time.time() + 120, ""
        while "serving on" not in err and proc.poll() is None and time.time() < deadline:
            err += proc.stderr.readline()
        assert f"serving on http://127.0.0.1:{port} ({line}, patches from" in err, err[-2000:]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
