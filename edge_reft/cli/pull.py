"""``edge-reft pull URL|PATH --sha256 HEX [--name alice] [--base MODEL]``: fetch a patch for offline use."""
from __future__ import annotations

import argparse


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="edge-reft pull", description=__doc__)
    ap.add_argument("source", help="an http(s) URL or a local path")
    ap.add_argument("--sha256", required=True, help="the patch file's sha256 (64 hex digits)")
    ap.add_argument("--name", default=None, help="the name to use it by (default: the file's stem)")
    ap.add_argument("--base", default=None, help="a model (.gguf or HF folder) the patch must fit")
    ap.add_argument("--max-bytes", type=int, default=None, help="size cap (default 16 MiB)")
    a = ap.parse_args(argv)
    from edge_reft.cli.inspect import format_patch
    from edge_reft.fingerprint import base_model
    from edge_reft.pull import pull
    from edge_reft.reftfile import load_patch
    from edge_reft.spec import DEFAULT_MAX_BYTES

    path = pull(a.source, a.sha256, a.name, base_model(a.base) if a.base else None,
                max_bytes=a.max_bytes or DEFAULT_MAX_BYTES)
    print(format_patch(load_patch(path, max_bytes=a.max_bytes or DEFAULT_MAX_BYTES)))
    print(f"\nsaved as {path}; use it with: edge-reft run --patch {path.stem}")
    return 0
