"""``edge-reft cache [list | clear WHAT]``: what edge-reft keeps in its per-user cache folder.

hf: float32 copies of GGUF models, written once per model for training an HF-side
backbone and for export-onnx (large: 4 bytes per parameter); onnx: graphs built by the
benchmarks and tests; models: assembled embedded models; shapes: the tests' random-weight
models of real architectures; llama-server: llama.cpp's server built by the serving
benchmarks; patches: patches fetched by `pull` (cleared only when named).  Any other
folder found there is listed too.  The folder is $EDGE_REFT_CACHE, else the platform's
cache folder."""
from __future__ import annotations

import shutil
import sys

from .common import verb_parser

KINDS = {"hf": "float32 copies of GGUF models (train, export-onnx)", "onnx": "ONNX graphs built by benchmarks",
         "models": "assembled embedded models", "shapes": "random-weight models of real architectures (tests)",
         "llama-server": "llama.cpp's own server (serving benchmarks)", "patches": "patches fetched by `edge-reft pull`"}


def main(argv: list[str]) -> int:
    ap = verb_parser("cache", __doc__, "edge-reft cache clear hf")
    ap.add_argument("action", nargs="?", choices=["list", "clear"], default="list", help="default: list")
    ap.add_argument("what", nargs="*", help=f"for clear: {', '.join(KINDS)} or all (everything but patches)")
    a = ap.parse_args(argv)
    from edge_reft.errors import ReftError
    from edge_reft.files import is_lock_file, lock_file, locked, tree_bytes
    from edge_reft.models import cache_dir
    root = cache_dir()
    if a.action == "list":
        print(f"cache folder: {root}")
        other = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in KINDS
                       and not p.name.startswith(".")) if root.is_dir() else []
        for kind, about in {**KINDS, **dict.fromkeys(other, "unknown to this version (clear leaves it)")}.items():
            d = root / kind
            entries = sorted(p for p in d.iterdir() if not p.name.startswith(".")) if d.is_dir() else []
            print(f"  {kind:<12} {tree_bytes(d) / 2**20 if d.is_dir() else 0:>10.1f} MiB  "
                  f"{len(entries):>3} entries  {about}")
            for e in entries:
                print(f"               {tree_bytes(e) / 2**20:>10.1f} MiB  {e.name}")
        return 0
    bad = [w for w in a.what if w not in (*KINDS, "all")]
    if bad or not a.what:
        raise ReftError(f"cache clear {' '.join(bad)}: say what to clear: {', '.join(KINDS)} or all")
    kinds = [k for k in KINDS if k != "patches"] if "all" in a.what else []
    kinds += [k for k in a.what if k != "all" and k not in kinds]
    for kind in kinds:
        d = root / kind
        if not d.is_dir():
            continue
        freed = 0
        for e in sorted(d.iterdir()):
            if is_lock_file(e):
                continue
            lock = lock_file(e)
            with locked(lock):  # never under a run that is writing it
                freed += tree_bytes(e)
                shutil.rmtree(e) if e.is_dir() and not e.is_symlink() else e.unlink()
                lock.unlink(missing_ok=True)
        print(f"cleared {kind}: {freed / 2**20:.1f} MiB", file=sys.stderr)
    return 0
