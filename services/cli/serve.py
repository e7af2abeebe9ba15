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
# With layers on a GPU a batching worker's step is bound by host work (sampling, the next plan,
# the gate) between llama_decode calls; with two, one's host work overlaps the other's decode.
# H200, SmolLM2, a patch per request: 1.30x / 1.27x llama-server's tokens/s at 8 / 32 clients with
# two workers of C/2 slots, 0.88x / 0.74x with one of C (benchmarks/results/serve_load_h200.txt).
GPU_WORKERS = 2


def default_workers(backend: str, options: dict) -> int:
    """--workers when not given: two batching engines with layers on a GPU, else one (on a CPU
    the cores are the limit, and one engine already uses them all)."""
    return GPU_WORKERS if backend == "llama.cpp" and (options.get("n_gpu_layers") or 0) > 0 else 1


def _check(a: argparse.Namespace) -> None:
    """Every bad option in one line, before the model is loaded."""
    problems = []
    if a.workers is not None and a.workers < 1:
        problems.append(f"--workers {a.workers}: expected an integer >= 1 (llama.cpp contexts)")
    if a.slots is not None and not 1 <= a.slots <= 256:
        problems.append(f"--slots {a.slots}: expected an integer in 1..256 (sequences a worker decodes together)")
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
    if a.replicas < 1:
        problems.append(f"--replicas {a.replicas}: expected an integer >= 1 (Ray Serve replicas)")
    if a.patch_cache < 0:
        problems.append(f"--patch-cache {a.patch_cache}: expected an integer >= 0 (patches kept bound)")
    if a.registry and not a.registry.lower().startswith(("http://", "https://")):
        problems.append(f"--registry {a.registry[:80]}: expected the http:// or https:// URL of a manifest")
    if not a.registry_ttl > 0:
        problems.append(f"--registry-ttl {a.registry_ttl}: expected seconds > 0")
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
    ap.add_argument("--workers", type=int, default=None,
                    help="engines (contexts) serving in parallel (default: 2 with layers on a GPU, where "
                         "one's host work overlaps the other's decode; else 1)")
    ap.add_argument("--slots", type=int, default=None,
                    help="requests each worker decodes together in one batch, each with its own patch "
                         "(default: 8 with llama.cpp; the onnx backend decodes one)")
    ap.add_argument("--queue", type=int, default=64,
                    help="requests that may wait for a worker; more get 503 with Retry-After (default 64)")
    ap.add_argument("--keys", metavar="KEYS.json",
                    help='bearer keys and the patches each may use: {"KEY": ["alice"], "OPS": "*"}; '
                         "without it any client may use any patch")
    ap.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                    help=f"one bearer key that may use every patch (default: ${API_KEY_ENV})")
    ap.add_argument("--quiet", action="store_true", help="no request log on stderr")
    ap.add_argument("--registry", metavar="URL",
                    help="a manifest of remote patches (JSON; services/serve/registry.py): a name not in "
                         "--patches is pulled from it on first use, sha256-verified")
    ap.add_argument("--registry-ttl", type=float, default=300.0,
                    help="seconds a fetched manifest is used before it is fetched again (default 300)")
    ap.add_argument("--registry-cache", metavar="DIR", help="where pulled patches are kept (default PATCHES/.registry)")
    ap.add_argument("--patch-cache", type=int, default=256,
                    help="patches kept bound in memory, least recently used evicted (default 256; ~30 KB "
                         "for a rank-4 one-layer patch on SmolLM2)")
    ap.add_argument("--pin", action="append", default=[], metavar="NAME[,NAME...]",
                    help="patches loaded at start-up and never evicted (a missing or invalid one stops it)")
    ap.add_argument("--ctx", type=int, default=2048, help="context size in tokens, per slot")
    ap.add_argument("--state-cache-mb", type=float, default=64.0,
                    help="per worker: KV states kept for other patches than the current one, so each "
                         "user's prompt is resumed (0: off)")
    ap.add_argument("--ray", action="store_true",
                    help="serve through Ray Serve: replicas chosen per patch (needs edge-reft[ray]); "
                         "--workers is then per replica; RAY_ADDRESS joins a running cluster")
    ap.add_argument("--replicas", type=int, default=2, help="with --ray: replicas (processes) of the app")
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
    from edge_reft.runtime.backends import backend_named
    slots = a.slots or backend_named(backend).slots
    if slots > 1 and backend_named(backend).slots == 1:
        raise ReftError(f"--slots {slots}: the {backend} backend decodes one sequence at a time; use --workers")
    workers = a.workers or default_workers(backend, options)
    app_options = dict(workers=workers, slots=slots, max_queue=a.queue, keys=keys, backend=backend,
                       log=not a.quiet, registry=a.registry, registry_ttl=a.registry_ttl,
                       registry_cache=a.registry_cache, patch_cache=a.patch_cache,
                       pin=[n for p in a.pin for n in p.split(",") if n], **options)
    if a.ray:  # the same app as Ray Serve deployments (services/serve/ray_serve.py; needs edge-reft[ray])
        sock.close()  # the port was free; Ray's HTTP proxy listens there
        from edge_reft.services.serve.ray_serve import serve_forever
        return serve_forever(model, a.patches, a.host, a.port, quiet=a.quiet, replicas=a.replicas, **app_options)
    app = create_app(model, a.patches, **app_options)
    auth = f", {len(keys)} keys" if keys else ""
    print(f"[edge-reft] serving on http://{a.host}:{a.port} ({workers} worker{'s' if workers > 1 else ''} of "
          f"{slots} slot{'s' if slots > 1 else ''}, patches from {a.patches}{auth})", file=sys.stderr)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    return 0
