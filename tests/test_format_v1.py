"""Format-1 files from before format 2 (tests/fixtures/v1, written by edge-reft da03a01):
they load as version 1, are written back byte for byte, and generate the tokens they
generated then."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_reft.reftfile import load_patch, save_patch

V1 = Path(__file__).parent / "fixtures" / "v1"
EXPECTED = json.loads((V1 / "expected.json").read_text())["tokens"]


@pytest.mark.parametrize("name", sorted(n for n in EXPECTED if n.endswith(".reft")))
def test_version_1_files_read_write_and_run_as_before(name, engine_q4, tmp_path):
    patch = load_patch(V1 / name, model=engine_q4.base)
    assert patch.version == 1
    again = save_patch(patch, tmp_path / name)  # today's writer keeps a format-1 patch format 1
    assert again.read_bytes() == (V1 / name).read_bytes()
    for prompt, tokens in EXPECTED[name].items():
        assert engine_q4.generate(prompt, patch=patch, max_tokens=24, stream=False).tokens == tokens, prompt


def test_the_base_model_answers_as_before(engine_q4):
    """The control: without a patch, the same tokens as then (so a difference above is the patch's)."""
    for prompt, tokens in EXPECTED["(no patch)"].items():
        assert engine_q4.generate(prompt, max_tokens=24, stream=False).tokens == tokens, prompt
