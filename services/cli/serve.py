"""``edge-reft serve [MODEL] --patches DIR``: OpenAI-compatible server, a patch per request."""
from __future__ import annotations

import argparse
import os
import sys

from edge_reft.errors import ReftError
from edge_reft.runtime.backends import add_options


def _check(a: argparse.Namespace) -> None:
    """Every bad option in one line, before the model is loaded."""
    problems = []
    if a.workers < 1:
        problems.append(f"--workers {a.workers}: expected an integer >= 1 (llama.cpp contexts)")
    if not 0 < a.port < 65536:
        problems.append(f"--port {a.port}: expected a TCP port in 1..65535")
    if a.queue < 0:
        problems.append(f"--queue {a.queue}: expected an integer >= 0 (requests waiting for a worker)")
    if a.ctx < 16:
        problems.append(f"--ctx {a.ctx}: expected an integer >= 16")
    if not a.state_cache_mb >= 0:
        problems.append(f"--state-cache-mb {a.state_cache_mb}: expected a number >= 0")
    if not os.path.isdir(a.patches):
        problems.append(f"--patches {a.patches}: not a folder")
    if problems:
        raise ReftError("; ".join(problems))


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="edge-reft serve", description=__doc__)
    ap.add_argument("model", nargs="?", help="a .gguf (llama.cpp) or an export-onnx folder; "
                    "default: the embedded SmolLM2")
    ap.add_argument("--patches", required=True, help='folder of NAME.reft files; requests say "patch": "NAME"')
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--workers", type=int, default=2, help="engines (contexts) serving in parallel")
    ap.add_argument("--queue", type=int, default=64,
                    help="requests that may wait for a worker; more get 503 with Retry-After (default 64)")
    ap.add_argument("--keys", metavar="KEYS.json",
                    help='bearer keys and the patches each may use: {"KEY": ["alice"], "OPS": "*"}; '
                         "without it any client may use any patch")
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--state-cache-mb", type=float, default=64.0,
                    help="per worker: KV states kept for other patches than the current one, so each "
                         "user's prompt is resumed (0: off)")
    add_options(ap)
    a = ap.parse_args(argv)
    _check(a)
    import uvicorn

    from edge_reft.services.serve.access import AccessKeys
    from edge_reft.services.serve.server import create_app
    from edge_reft.services.cli.run import engine_choice
    keys = AccessKeys.load(a.keys) if a.keys else None
    model, backend, options = engine_choice(a, a.model, n_ctx=a.ctx, state_cache_mb=a.state_cache_mb)
    app = create_app(model, a.patches, workers=a.workers, max_queue=a.queue, keys=keys, backend=backend,
                     **options)
    auth = f", {len(keys)} keys" if keys else ""
    print(f"[edge-reft] serving on http://{a.host}:{a.port} (patches from {a.patches}{auth})", file=sys.stderr)
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning")
    return 0
