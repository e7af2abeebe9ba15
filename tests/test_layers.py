"""The layers of the code, as the folders and package docstrings state them.

Every package's ``__init__`` docstring has a line ``Imports: a, b`` naming the
edge-reft packages its modules may import besides their own (``-`` for none).
This test reads every import in the tree, lazy ones inside functions included,
resolves it through pyproject's package-dir (which maps converters/, runtime/
and services/ to edge_reft.*), and fails on any edge a docstring does not
allow: an upward edge is a red test, not a reviewer's catch.
"""
from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The package's front door: ``edge_reft.Engine`` and ``python -m edge_reft`` open the layers
# above the core, lazily (importing edge_reft never loads a backend).
FRONT_DOOR = {"edge_reft": {"edge_reft.runtime"}, "edge_reft.__main__": {"edge_reft.services.cli"}}
# Libraries the core never imports, not even lazily: it runs on machines without them.
NOT_IN_CORE = {"torch", "transformers", "bitsandbytes", "llama_cpp", "onnxruntime", "fastapi", "uvicorn"}


def package_dirs() -> dict[str, Path]:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = cfg["package-dir"]
    out = {}
    for pkg in cfg["packages"]:
        parent = max((p for p in mapping if pkg == p or pkg.startswith(p + ".")), key=len)
        out[pkg] = ROOT / mapping[parent] / Path(*pkg[len(parent):].split(".")[1:])
    return out


def modules() -> dict[str, tuple[str, Path]]:
    """module name -> (its package, its file)."""
    out = {}
    for pkg, folder in package_dirs().items():
        for f in sorted(folder.glob("*.py")):
            name = pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"
            out[name] = (pkg, f)
    return out


def imports(name: str, path: Path) -> set[str]:
    """Every module ``path`` imports, absolute and relative, at any depth of the code."""
    is_pkg = path.stem == "__init__"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = name.split(".")
                base = parts[:len(parts) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)  # "from pkg import module"
    return found


def owner(module: str, mods: dict) -> str | None:
    """The edge-reft package a module name lies in (None: not ours)."""
    while module:
        if module in mods:
            return mods[module][0]
        module = module.rpartition(".")[0]
    return None


def allowed(pkg: str, mods: dict) -> set[str]:
    doc = ast.get_docstring(ast.parse(mods[pkg][1].read_text())) or ""
    m = re.search(r"^Imports: (.+)$", doc, re.M)
    assert m, f"{mods[pkg][1]}: the docstring lacks its 'Imports: ...' line"
    return {pkg} | {x.strip() for x in m.group(1).split(",") if x.strip() not in ("", "-")}


MODS = modules()


@pytest.mark.parametrize("module", sorted(MODS))
def test_imports_follow_the_layers(module):
    pkg, path = MODS[module]
    ok = allowed(pkg, MODS) | FRONT_DOOR.get(module, set())
    bad = sorted({f"{imp} (in {owner(imp, MODS)})" for imp in imports(module, path)
                  if owner(imp, MODS) not in (None, *ok)})
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}; {pkg} may import {sorted(ok)}"


def test_core_never_imports_heavy_libraries():
    core = [(m, f) for m, (pkg, f) in MODS.items() if pkg == "edge_reft"]
    bad = {f.name: sorted(i.split(".")[0] for i in imports(m, f) if i.split(".")[0] in NOT_IN_CORE)
           for m, f in core}
    assert not {k: v for k, v in bad.items() if v}


def test_each_package_states_its_layer_and_no_cycles_between_packages():
    graph = {pkg: allowed(pkg, MODS) - {pkg} for pkg in package_dirs()}
    assert set().union(*graph.values()) <= set(graph), "a docstring names a package that does not exist"
    seen, done = set(), set()

    def visit(p, path):
        assert p not in seen or p in done, f"packages import in a circle: {' -> '.join(path + [p])}"
        if p in seen:
            return
        seen.add(p)
        for q in graph[p]:
            visit(q, path + [p])
        done.add(p)
    for p in graph:
        visit(p, [])


def test_the_backend_table_names_engines_inside_runtime():
    from edge_reft.runtime.backends import BACKENDS
    for b in BACKENDS:
        module = b.engine.split(":")[0]
        assert owner(module, MODS) is not None and module.startswith("edge_reft.runtime."), b
        assert isinstance(b.engine_class(), type)


def test_a_wrong_edge_is_caught(tmp_path):
    """The checker itself: a core module importing the runtime is reported."""
    f = tmp_path / "spec.py"
    f.write_text("def f():\n    from .runtime.engine import EngineBase\n")
    found = imports("edge_reft.spec", f)
    assert "edge_reft.runtime.engine" in found and owner("edge_reft.runtime.engine", MODS) == "edge_reft.runtime"
    assert owner("edge_reft.runtime.engine", MODS) not in allowed("edge_reft", MODS)
