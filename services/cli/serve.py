"""``edge-reft serve [MODEL] --patches DIR``: OpenAI-compatible server, a patch per request.

A request picks its patch with "model": "NAME" (or "BASE+NAME", several joined
with "+" stack), or "patch": "NAME"; /v1/models lists them."""
from __future__ import annotations

import argparse
import os
import sys

from edge_reft.errors import ReftError
from edge_reft.runtime.backends import add_options

from .common import add_model, verb_parser

API_KEY_ENV = "EDGE_REFT_API_KEY"


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


def bind(host: str, port: int):
    """The listening socket, made before the model loads, so a busy port is said at once
    (and never after "serving on")."""
    import socket
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ReftError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ReftError(f"--host {host} --port {port}: cannot listen there ({e.strerror}); "
                        "another server may be using it: choose another --port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def main(argv: list[str]) -> int:
    ap = verb_parser("serve", __doc__, "edge-reft serve -m model.gguf --patches patches/ --port 8080")
    add_model(ap, "a .gguf (llama.cpp) or an export-onnx folder")
    ap.add_argument("--patches", required=True, help='folder of NAME.reft files; requests say "model": "NAME"')
    ap.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    ap.add_argument("--port", type=int, default=8080, help="the TCP port")
    ap.add_argument("--workers", type=int, default=2, help="engines (contexts) serving in parallel")
    ap.add_argument("--queue", type=int, default=64,
                    help="requests that may wait for a worker; more get 503 with Retry-After (default 64)")
    ap.add_argument("--keys", metavar="KEYS.json",
                    help='bearer keys and the patches each may use: {"KEY": ["alice"], "OPS": "*"}; '
                         "without it any client may use any patch")
    ap.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                    help=f"one bearer key that may use every patch (default: ${API_KEY_ENV})")
    ap.add_argument("--quiet", action="store_true", help="no request log on stderr")
    ap.add_argument("--ctx", type=int, default=2048, help="context size in tokens, per worker")
    ap.add_argument("--state-cache-mb", type=float, default=64.0,
                    help="per worker: KV states kept for other patches than the current one, so each "
                         "user's prompt is resumed (0: off)")
    add_options(ap)
    a = ap.parse_args(argv)
    _check(a)
    from edge_reft.services.serve.access import AccessKeys
    keys = AccessKeys.load(a.keys) if a.keys else None
    if a.api_key:
        keys = AccessKeys.single(a.api_key, "--api-key" if API_KEY_ENV not in os.environ
                                 else f"--api-key / ${API_KEY_ENV}").merged(keys)
    sock = bind(a.host, a.port)
    import uvicorn

    from edge_reft.services.serve.server import create_app
    from edge_reft.services.cli.run import engine_choice
    model, backend, options = engine_choice(a, n_ctx=a.ctx, state_cache_mb=a.state_cache_mb)
    app = create_app(model, a.patches, workers=a.workers, max_queue=a.queue, keys=keys, backend=backend,
                     log=not a.quiet, **options)
    auth = f", {len(keys)} keys" if keys else ""
    print(f"[edge-reft] serving on http://{a.host}:{a.port} (patches from {a.patches}{auth})", file=sys.stderr)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    return 0
