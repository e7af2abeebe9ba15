"""``edge-reft serve [MODEL] --patches DIR``: OpenAI-compatible server, a patch per request."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="edge-reft serve", description=__doc__)
    ap.add_argument("model", nargs="?", help="a .gguf (default: the embedded SmolLM2)")
    ap.add_argument("--patches", required=True, help='folder of NAME.reft files; requests say "patch": "NAME"')
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--workers", type=int, default=2, help="llama.cpp contexts serving in parallel")
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--ngl", type=int, default=0)
    ap.add_argument("--state-cache-mb", type=float, default=64.0,
                    help="per worker: KV states kept for other patches than the current one, so each "
                         "user's prompt is resumed (0: off)")
    a = ap.parse_args(argv)
    import uvicorn

    from edge_reft.runtime.server import create_app
    app = create_app(a.model, a.patches, workers=a.workers, n_ctx=a.ctx, n_gpu_layers=a.ngl,
                     state_cache_mb=a.state_cache_mb)
    print(f"[edge-reft] serving on http://{a.host}:{a.port} (patches from {a.patches})", file=sys.stderr)
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning")
    return 0
