"""Portability: CPU weight repacking chosen safely (AMX), split decode exact, no platform
library names, and a native gate that builds with every C compiler at hand."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from edge_reft.errors import BackendError
from edge_reft.patch import random_patch
from edge_reft.runtime import Engine
from edge_reft.runtime.llamacpp.native import cpu_extra_bufts
from edge_reft.runtime.llamacpp.repack import REPACK_ENV, choose_repack
from oracles import second_turn_cached_and_fresh, stepwise_logits

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("mode, bufts, use", [
    ("auto", ["AMX", "CPU_REPACK"], False),     # Sapphire Rapids-class x86: the crash is avoided
    ("auto", ["CPU_REPACK"], True),             # AVX2 / ARM: llama.cpp's repack kept
    ("auto", ["CPU_KLEIDIAI", "CPU_REPACK"], True),
    ("auto", [], True),
    ("on", ["AMX", "CPU_REPACK"], True),        # forced either way
    ("off", ["CPU_REPACK"], False),
])
def test_repack_choice_is_pinned_for_both_cases(mode, bufts, use, monkeypatch):
    monkeypatch.delenv(REPACK_ENV, raising=False)
    got, why = choose_repack(mode, bufts)
    assert got is use and ("AMX" in why) == ("AMX" in bufts)


def test_repack_environment_override(monkeypatch):
    monkeypatch.setenv(REPACK_ENV, "off")
    assert choose_repack(None, ["CPU_REPACK"])[0] is False
    assert choose_repack("on", ["AMX"])[0] is True  # an explicit option beats the environment
    monkeypatch.setenv(REPACK_ENV, "yes")
    with pytest.raises(BackendError, match=r"\$EDGE_REFT_REPACK: 'yes', expected one of auto, on, off"):
        choose_repack(None, [])


def test_this_machines_choice_follows_its_buffer_types(monkeypatch):
    monkeypatch.delenv(REPACK_ENV, raising=False)
    bufts = cpu_extra_bufts()
    assert all(isinstance(b, str) and b for b in bufts)
    assert choose_repack()[0] is not any(b.startswith("AMX") for b in bufts)


def test_run_verbose_says_what_was_chosen(smol_q4):
    out = subprocess.run([sys.executable, "-m", "edge_reft", "run", str(smol_q4), "-v", "-p", "Hi", "-n", "2"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert re.search(r"CPU weight repacking (on|off)", out.stderr) and "one context" in out.stderr


def test_repack_off_and_on_give_the_same_tokens(smol_q4):
    """Q4_1 has no repacked kernel on x86 AVX2, so both loads run the same kernels here."""
    answers = []
    for mode in ("off", "auto"):
        with Engine(smol_q4, n_ctx=256, repack=mode) as e:
            answers.append(e.generate("Name a colour.", max_tokens=8, stream=False).tokens)
    assert answers[0] == answers[1]


@pytest.fixture(scope="module")
def split_and_one(smol_q4):
    engines = {s: Engine(smol_q4, n_ctx=512, split_decode=s) for s in (True, False)}
    yield engines
    for e in engines.values():
        e.close()


@pytest.mark.parametrize("spec, moves", [([(15, "l1", 4)], 1), ([(1, "f1+l1", 4), (29, "l1", 2)], 1),
                                         ([(15, "all", 4)], 0), ([], 0)])
def test_split_decode_is_bitwise_one_context(split_and_one, spec, moves):
    split, one = split_and_one[True], split_and_one[False]
    assert split.native.split and not one.native.split
    patch = random_patch(split.base, spec, scale=4.0, seed=5) if spec else None
    prompt = split.prompt_tokens("Tell me about the moon and its phases.")
    cont = split.prompt_tokens("The moon has phases because it orbits the Earth.", raw=True)
    before = split.native.moves
    a, b = stepwise_logits(split, prompt, cont, patch), stepwise_logits(one, prompt, cont, patch)
    assert np.array_equal(a, b)
    assert split.native.moves - before == moves  # prompt-scoped: prefill edits, then one move
    if spec:
        assert not np.array_equal(a, stepwise_logits(one, prompt, cont, None)), "the patch must change something"


def test_split_decode_keeps_the_kv_rules(split_and_one):
    split = split_and_one[True]
    _, cached, fresh = second_turn_cached_and_fresh(split, 15, "l1")
    assert cached.reused_tokens > 0 and cached.tokens == fresh.tokens


def test_runtime_spells_no_platform_library_name():
    pattern = re.compile(r"""["'][^"']*\.(so|dylib|dll)["']""")
    hits = [f"{p.name}:{i}" for p in (ROOT / "runtime").rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, f"platform library file names in the runtime: {hits}"


def _compilers() -> list[str]:
    return [c for c in ("gcc", "clang") if shutil.which(c)]


@pytest.mark.parametrize("cc", _compilers())
def test_gate_is_portable_c(cc, tmp_path):
    """runtime/llamacpp/gate.c compiles as strict C99 with warnings as errors (gcc, and clang where
    installed), and exports its entry points."""
    out = tmp_path / "gate.so"
    inc = sysconfig.get_paths()["include"]
    subprocess.run([cc, "-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-O2", "-fPIC", "-shared",
                    "-fvisibility=hidden", f"-I{inc}", str(ROOT / "runtime" / "llamacpp" / "gate.c"), "-o", str(out)],
                   check=True, capture_output=True, text=True)
    import ctypes
    lib = ctypes.CDLL(str(out))
    for name in ("edge_gate_eval", "edge_gate_new", "edge_gate_set_jobs", "edge_gate_take_error",
                 "edge_gate_abi", "edge_gate_free"):
        assert getattr(lib, name)


def test_install_without_a_compiler_falls_back_to_the_python_gate(tmp_path):
    src, target = tmp_path / "src", tmp_path / "site"  # a clean copy: no build/ left from another build
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".*", "build", "*.so", "__pycache__", "*.egg-info"))
    env = dict(os.environ, CC="/nonexistent/cc", LDSHARED="/nonexistent/cc -shared")
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-v",
                          "--target", str(target), str(src)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "the native gate was not built" in out.stdout + out.stderr
    check = ("import json; from edge_reft.runtime.llamacpp.gate import load_gate, make_hook; "
             "print(json.dumps([load_gate() is None, type(make_hook('auto', 8)).__name__]))")
    # -S: no .pth files, so the suite's own editable install (and its built gate) stays out of sight
    path = os.pathsep.join([str(target), *[p for p in sys.path if p]])
    got = subprocess.run([sys.executable, "-S", "-c", check], capture_output=True, text=True, cwd="/",
                         env=dict(os.environ, PYTHONPATH=path), check=True)
    assert json.loads(got.stdout) == [True, "EvalHook"]
