"""The examples run as written, against the embedded SmolLM2 (smaller sizes where they take flags).
The two that train a patch take about a minute each: slow (CI runs them after the default suite)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(name: str, *args: str, timeout: int = 900) -> str:
    r = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_embed_in_app_streams_the_shipped_patch():
    out = run("embed_in_app.py")
    lines = dict(line.split("] ", 1) for line in out.strip().splitlines())
    assert lines["[with the patch"].strip() == "42"          # 17 + 25, answered with the bare number
    assert lines["[without the patch"].strip() != "42"


@pytest.mark.slow
def test_personalize_offline(tmp_path):
    out = run("personalize_offline.py", "--out", str(tmp_path / "me.reft"), "--examples", "24",
              "--epochs", "1", "--test-examples", "8")
    assert (tmp_path / "me.reft").exists() and "held-out exact match" in out and "[with patch]" in out


@pytest.mark.slow
def test_serve_many_users(tmp_path):
    out = run("serve_many_users.py", "--patches", str(tmp_path), "--examples", "16", "--epochs", "1")
    for user in ("alice", "bob", "carol"):
        assert f"{user}'s patch:" in out and (tmp_path / f"{user}.reft").exists()
