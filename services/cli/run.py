"""``edge-reft run [MODEL] --patch P [-p PROMPT | --chat]``: generate with patches."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from edge_reft.runtime.backends import add_options


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="edge-reft run", description=__doc__)
    ap.add_argument("model", nargs="?", help="a .gguf (llama.cpp) or an export-onnx folder; "
                    "default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--patch", action="append", default=[], metavar="P",
                    help="a .reft file or the name of a pulled patch (repeat to stack; applied in order)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("-p", "--prompt", help="the user message (goes through the chat template)")
    src.add_argument("--chat", action="store_true", help="interactive conversation")
    ap.add_argument("--raw", action="store_true", help="send the prompt as is (special tokens parsed)")
    ap.add_argument("-n", "--max-tokens", type=int, default=128)
    ap.add_argument("--temp", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    ap.add_argument("--ctx", type=int, default=2048, help="context size in tokens")
    ap.add_argument("--threads", type=int, default=None)
    add_options(ap)
    ap.add_argument("--allow-mismatch", action="store_true",
                    help="apply a patch made for another base model (its effect is unpredictable)")
    ap.add_argument("--json", action="store_true",
                    help='print {"prompt_tokens": [...], "tokens": [...], "text": "..."} at the end')
    ap.add_argument("-v", "--verbose", action="store_true",
                    help="show the backend's log and the runtime's choices (llama.cpp: repacking, "
                         "contexts, gate)")
    return ap


def utf8(flag: str, text: str | bytes) -> str:
    """``text`` as valid Unicode: argv holds undecodable bytes as lone surrogates, which no
    tokenizer can take; refuse them by name instead of failing deep inside."""
    from edge_reft.errors import ReftError
    try:
        raw = text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")
        return raw.decode("utf-8")
    except UnicodeError as e:
        raise ReftError(f"{flag}: not valid UTF-8 text (at position {e.start}: "
                        f"{e.object[e.start:e.start + 1]!r})") from None


def engine_choice(a: argparse.Namespace, model: str | None, **common: Any) -> tuple[str, str, dict]:
    """(model, backend, engine keywords) for ``run``, ``serve`` and ``eval``: ``model`` or the
    embedded SmolLM2, the backend the table picks (or ``--backend``), the verb's ``common``
    options and the backend's own flags given in ``a``."""
    from edge_reft.models import default_model
    from edge_reft.runtime.backends import backend_for, engine_options
    model = model or str(default_model())
    row = backend_for(model, a.backend)
    return model, row.name, {**common, **engine_options(a, row)}


def main(argv: list[str]) -> int:
    a = parser().parse_args(argv)
    from edge_reft.errors import ReftError

    if a.prompt is None and not a.chat:
        if sys.stdin.isatty():
            raise ReftError("give a prompt with -p, or --chat for a conversation (or pipe text on stdin)")
        a.prompt = utf8("stdin", sys.stdin.buffer.read())
    elif a.prompt is not None:
        a.prompt = utf8("-p", a.prompt)
    a.stop = [utf8("--stop", x) for x in a.stop]
    from edge_reft.runtime import Engine
    t0 = time.perf_counter()
    model, backend, options = engine_choice(a, a.model, n_ctx=a.ctx, n_threads=a.threads, verbose=a.verbose)
    engine = Engine(model, backend, **options)
    from edge_reft.pull import resolve
    pset = engine.patch_set([resolve(p) for p in a.patch], allow_mismatch=a.allow_mismatch)
    print(f"[edge-reft] {engine.base.name or engine.base.architecture}: loaded in "
          f"{time.perf_counter() - t0:.2f} s; patches: {', '.join(a.patch) or 'none'}", file=sys.stderr)
    if a.verbose:
        print(f"[edge-reft] {engine.runtime_notes()}", file=sys.stderr)
    gen_opts = dict(patch=pset, max_tokens=a.max_tokens, temperature=a.temp, top_p=a.top_p,
                    top_k=a.top_k, seed=a.seed, stop=a.stop)
    try:
        if a.chat:
            return _chat(engine, a.raw, gen_opts)
        gen = engine.generate(a.prompt, raw=a.raw, **gen_opts)
        for piece in gen:
            if not a.json:
                sys.stdout.write(piece)
                sys.stdout.flush()
        r = gen.result
        if a.json:
            print(json.dumps({"prompt_tokens": r.prompt_tokens, "tokens": r.tokens, "text": r.text,
                              "finish_reason": r.finish_reason}))
        else:
            sys.stdout.write("\n")
        n = max(len(r.tokens), 1)
        print(f"[edge-reft] prompt {len(r.prompt_tokens)} tokens in {r.prefill_s * 1e3:.0f} ms; "
              f"{len(r.tokens)} tokens at {r.decode_s / n * 1e3:.1f} ms/token", file=sys.stderr)
    finally:
        engine.close()
    return 0


def _chat(engine, raw: bool, gen_opts: dict) -> int:
    if raw:
        from edge_reft.errors import ReftError
        raise ReftError("--chat uses the chat template; it cannot be combined with --raw")
    messages: list[dict] = []
    print("[edge-reft] chat: an empty line or Ctrl-D ends it", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        gen = engine.generate(messages=messages, **gen_opts)
        for piece in gen:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": gen.result.text})
    return 0
