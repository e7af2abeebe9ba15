"""Both install paths give one import name with the mapped folders: the editable
install the suite runs in, and a regular (non-editable) install built here."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHECK = """
import json, sys, edge_reft, edge_reft.runtime, edge_reft.converters
from edge_reft.runtime.llamacpp.gate import load_gate
print(json.dumps({"core": edge_reft.__file__, "runtime": edge_reft.runtime.__file__,
                  "converters": edge_reft.converters.__file__, "gate": load_gate() is not None,
                  "torch": "torch" in sys.modules}))
"""


def _check(env_path: str | None = None) -> dict:
    env = None
    if env_path:
        import os
        env = dict(os.environ, PYTHONPATH=env_path)
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env,
                         check=True, cwd="/")
    return json.loads(out.stdout)


def test_editable_install_maps_the_folders():
    r = _check()
    assert Path(r["runtime"]) == ROOT / "runtime" / "__init__.py"
    assert Path(r["converters"]) == ROOT / "converters" / "__init__.py"
    assert r["gate"] and not r["torch"]


def test_regular_install_maps_the_folders(tmp_path, smol_q4):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True, capture_output=True, timeout=600)
    r = _check(str(target))
    assert Path(r["core"]).is_relative_to(target) and Path(r["runtime"]).is_relative_to(target)
    assert Path(r["converters"]) == target / "edge_reft" / "converters" / "__init__.py"
    assert r["gate"], "the native gate must be built by a regular install too"
    assert (target / "edge_reft" / "data" / "demo.reft").is_file(), "the demo patch ships in the wheel"
    import os
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run([sys.executable, "-m", "edge_reft", "inspect", str(smol_q4), "--json"],
                         capture_output=True, text=True, env=env, check=True, cwd="/")
    assert json.loads(out.stdout)["n_layer"] == 30
