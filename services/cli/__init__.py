"""``edge-reft VERB ...``: a tiny dispatcher that imports only the verb's module.

``edge-reft run`` and ``edge-reft inspect`` must start fast and never import
torch, so no verb module is imported until it is chosen.

Imports: edge_reft, edge_reft.runtime, edge_reft.train, edge_reft.converters, edge_reft.services, edge_reft.services.serve
"""
from __future__ import annotations

import importlib
import sys

# verb -> (module under edge_reft.services.cli, one-line summary)
VERBS = {
    "run": ("run", "generate with a model and patches (llama.cpp or ONNX Runtime)"),
    "inspect": ("inspect", "show a .reft patch or a model GGUF (and its fingerprint)"),
    "train": ("train", "train a patch on a 4-bit backbone (GGUF or HF folder; needs [train])"),
    "train-many": ("train_many", "train many users' patches together over one backbone (needs [train])"),
    "eval": ("evaluate", "accuracy of a patch on a JSONL data set, with and without it"),
    "convert": ("convert", "convert pyreft checkpoints to .reft and back"),
    "export-onnx": ("export_onnx", "build an ONNX Runtime model with patch inputs"),
    "serve": ("serve", "OpenAI-compatible HTTP server with a patch per request"),
    "pull": ("pull", "download a patch into the per-user cache, verified"),
    "demo": ("demo", "a patch on the embedded SmolLM2, before and after"),
    "cache": ("cache", "list or clear what edge-reft keeps in its cache folder"),
}


def usage() -> str:
    width = max(map(len, VERBS))
    lines = [f"  {v:<{width}}  {s}" for v, (_, s) in VERBS.items()]
    return ("usage: edge-reft VERB [options]   (edge-reft help VERB, or edge-reft VERB --help)\n\nverbs:\n"
            + "\n".join(lines) + "\n\nstart with:  edge-reft demo     edge-reft run -p 'Hello'     edge-reft -V")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["help"] and len(argv) > 1 and argv[1] in VERBS:
        argv = [argv[1], "--help"]  # edge-reft help VERB = edge-reft VERB --help
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version", "version"):
        from edge_reft import __version__
        print(f"edge-reft {__version__}")
        return 0
    verb = argv[0]
    if verb not in VERBS:
        print(f"edge-reft: unknown verb {verb!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"edge_reft.services.cli.{VERBS[verb][0]}")
    from edge_reft.errors import ReftError
    try:
        return int(module.main(argv[1:]) or 0)
    except ReftError as e:  # a user's mistake: one clear message, no traceback
        print(f"edge-reft {verb}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the file system said no (a missing folder, a full disk, no permission)
        where = f"{e.filename}: " if e.filename else ""
        print(f"edge-reft {verb}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"edge-reft {verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
