"""Checkpoints that pyreft 0.1.0 itself trained (tests/fixtures/pyreft: one per intervention
type, on SmolLM2, made by tests/fixtures/pyreft/build.sh in a venv with pyreft's pinned
transformers 4.45.1), converted under both dataset conventions and run by llama.cpp on the
F32 GGUF (the weights pyreft trained on): greedy tokens equal to pyreft's own generate,
prompts of 1 to 5 tokens included (shorter than 2*max(N, M) for f3+l3, where pyreft's
floor(n/2) caps bite)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge_reft.converters.pyreft import convert

FIXTURES = Path(__file__).parent / "fixtures" / "pyreft"
OUTPUTS = json.loads((FIXTURES / "outputs.json").read_text())
CHECKPOINTS = {c["name"]: c for c in OUTPUTS["checkpoints"]}
CONVENTION = {"prompt_end": "end", "before_last": "end-1"}  # make.py's names -> ours
EOS = OUTPUTS["meta"]["tokenizer"]["eos_id"]


def test_every_pyreft_type_is_here():
    assert sorted(c["pyreft_class"] for c in CHECKPOINTS.values()) == sorted(
        ["LoreftIntervention", "NoreftIntervention", "ConsreftIntervention", "LobireftIntervention",
         "DireftIntervention", "NodireftIntervention"])
    assert any(c["positions"] == "f3+l3" and not c["share_weights"] for c in CHECKPOINTS.values())


def _convert(name: str, convention: str, smol_f32: Path, tmp_path: Path):
    c = CHECKPOINTS[name]
    return convert(FIXTURES / c["folder"], smol_f32, tmp_path / f"{name}-{convention}.reft", c["positions"],
                   c["share_weights"], convention=CONVENTION[convention])


def _pyreft_tokens(gen: dict) -> list[int]:
    out = list(gen["new_ids"])
    return out[:out.index(EOS)] if EOS in out else out


@pytest.mark.parametrize("convention", sorted(CONVENTION))
@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_greedy_tokens_equal_pyrefts_own_generation(name, convention, engines_f32, smol_f32, tmp_path):
    patch = _convert(name, convention, smol_f32, tmp_path)
    engine = engines_f32["native"]
    gens = CHECKPOINTS[name]["generations"][convention]
    changed = 0
    for gen in gens:
        toks = engine.prompt_tokens(gen["prompt"], raw=True)
        assert toks == gen["prompt_ids"], "the same prompt tokens as pyreft's tokenizer"
        got = engine.generate(prompt_tokens=toks, patch=patch, max_tokens=24, stream=False).tokens
        assert got == _pyreft_tokens(gen), (gen["prompt"], gen["n"], gen["locations"])
        changed += gen["differs_from_base_in_first_10"]
    assert changed >= 3, "the patch must change several prompts for this to mean anything"


@pytest.mark.parametrize("name", ["loreft", "direft"])
def test_the_wrong_convention_generates_something_else(name, engines_f32, smol_f32, tmp_path):
    """The control: a convention is not a detail, pyreft's tokens differ under the other one."""
    patch = _convert(name, "before_last", smol_f32, tmp_path)  # against the prompt_end generations
    engine = engines_f32["native"]
    gens = CHECKPOINTS[name]["generations"]["prompt_end"]
    differ = sum(engine.generate(prompt_tokens=g["prompt_ids"], patch=patch, max_tokens=24, stream=False).tokens
                 != _pyreft_tokens(g) for g in gens)
    assert differ >= len(gens) // 2


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_edge_reft_run_reproduces_one_generation(name, smol_f32, tmp_path):
    """The command line, end to end: convert, then `edge-reft run --raw` on the F32 GGUF."""
    c = CHECKPOINTS[name]
    convention = "before_last" if name in ("noreft", "direft", "lobireft") else "prompt_end"
    out = tmp_path / "p.reft"
    r = subprocess.run([sys.executable, "-m", "edge_reft", "convert", "pyreft", str(FIXTURES / c["folder"]),
                        "--base", str(smol_f32), "--positions", c["positions"],
                        *(["--share-weights"] if c["share_weights"] else []),
                        "--dataset-convention", CONVENTION[convention], "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    gen = max(c["generations"][convention], key=lambda g: g["differs_from_base_in_first_10"])
    r = subprocess.run([sys.executable, "-m", "edge_reft", "run", str(smol_f32), "--patch", str(out), "--raw",
                        "-p", gen["prompt"], "-n", "24", "--json", "--kv-f32", "on"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["prompt_tokens"] == gen["prompt_ids"] and result["tokens"] == _pyreft_tokens(gen)
