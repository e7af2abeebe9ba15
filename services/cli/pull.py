"""``edge-reft pull URL|PATH --sha256 HEX [--name alice] [--base MODEL]``: fetch a patch for offline use."""
from __future__ import annotations

from .common import verb_parser



def main(argv: list[str]) -> int:
    ap = verb_parser("pull", __doc__, "edge-reft pull https://example.org/alice.reft --sha256 <64 hex digits> --name alice")
    ap.add_argument("source", help="an http(s) URL or a local path")
    ap.add_argument("--sha256", required=True, help="the patch file's sha256 (64 hex digits)")
    ap.add_argument("--name", default=None, help="the name to use it by (default: the file's stem)")
    ap.add_argument("--base", default=None, help="a model (.gguf or HF folder) the patch must fit")
    ap.add_argument("--max-bytes", type=int, default=None, help="size cap (default 16 MiB)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds the whole download may take (default 600)")
    a = ap.parse_args(argv)
    from edge_reft.services.cli.inspect import format_patch
    from edge_reft.fingerprint import base_model
    from edge_reft.errors import ReftError
    from edge_reft.pull import DEFAULT_DEADLINE, pull
    from edge_reft.reftfile import load_patch
    from edge_reft.spec import DEFAULT_MAX_BYTES

    if a.deadline is not None and not 0 < a.deadline < float("inf"):
        raise ReftError(f"--deadline {a.deadline}: expected a number of seconds > 0")
    path = pull(a.source, a.sha256, a.name, base_model(a.base) if a.base else None,
                max_bytes=a.max_bytes or DEFAULT_MAX_BYTES, deadline=a.deadline or DEFAULT_DEADLINE)
    print(format_patch(load_patch(path, max_bytes=a.max_bytes or DEFAULT_MAX_BYTES)))
    print(f"\nsaved as {path}; use it with: edge-reft run --patch {path.stem}")
    return 0
