"""``edge-reft run [MODEL] --patch P [-p PROMPT | --chat]``: generate with patches."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from edge_reft.runtime.backends import add_options

from .common import add_model, model_of, verb_parser


def parser() -> argparse.ArgumentParser:
    ap = verb_parser("run", __doc__, "edge-reft run -m model.gguf --patch user.reft -p 'Write a haiku'")
    add_model(ap, "a .gguf (llama.cpp) or an export-onnx folder")
    ap.add_argument("--patch", action="append", default=[], metavar="P",
                    help="a .reft file or the name of a pulled patch (repeat to stack; applied in order)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("-p", "--prompt", help="the user message (goes through the chat template)")
    src.add_argument("--chat", action="store_true", help="interactive conversation")
    ap.add_argument("--system", help="a system message before the prompt (chat template only)")
    ap.add_argument("--raw", action="store_true", help="send the prompt as is (special tokens parsed)")
    ap.add_argument("-n", "--max-tokens", type=int, default=128, help="the most tokens to generate")
    s = ap.add_argument_group("sampling (runtime/sampling.py; the same defaults as the Python API)")
    s.add_argument("--temp", type=float, default=0.0, help="temperature; 0 = greedy")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; 1 = off")
    s.add_argument("--top-k", type=int, default=0, help="0 = off")
    s.add_argument("--min-p", type=float, default=0.0, help="0 = off")
    s.add_argument("--repeat-penalty", type=float, default=1.0,
                   help="divides the logits of tokens the reply repeats; 1 = off, 1.1 is a common choice")
    s.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI's; 0 = off")
    s.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI's; 0 = off")
    s.add_argument("--penalty-last-n", type=int, default=64,
                   help="how many of the reply's last tokens the penalties see; 0 = all")
    s.add_argument("--seed", type=int, default=0, help="for sampling with --temp > 0")
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    ap.add_argument("--ctx", type=int, default=2048, help="context size in tokens")
    ap.add_argument("--threads", type=int, default=None, help="default: every core")
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


def engine_choice(a: argparse.Namespace, **common: Any) -> tuple[str, str, dict]:
    """(model, backend, engine keywords) for ``run`` and ``serve``: the model given (or the
    embedded SmolLM2), the backend the table picks (or ``--backend``), the verb's ``common``
    options and the backend's own flags given in ``a``."""
    from edge_reft.runtime.backends import backend_for, engine_options
    model = model_of(a)
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
    if a.system is not None:
        if a.raw:
            raise ReftError("--system goes through the chat template; it cannot be combined with --raw")
        a.system = utf8("--system", a.system)
    from edge_reft.runtime import Engine
    t0 = time.perf_counter()
    model, backend, options = engine_choice(a, n_ctx=a.ctx, n_threads=a.threads, verbose=a.verbose)
    engine = Engine(model, backend, **options)
    from edge_reft.pull import resolve
    paths = [resolve(p) for p in a.patch]
    real = [os.path.realpath(p) for p in paths]
    for dup in sorted({r for r in real if real.count(r) > 1}):
        print(f"[edge-reft] warning: the patch {dup} is given {real.count(dup)} times: its edit is "
              "applied that many times, in order", file=sys.stderr)
    pset = engine.patch_set(paths, allow_mismatch=a.allow_mismatch)
    print(f"[edge-reft] {engine.base.name or engine.base.architecture}: loaded in "
          f"{time.perf_counter() - t0:.2f} s; patches: {', '.join(a.patch) or 'none'}", file=sys.stderr)
    if a.verbose:
        print(f"[edge-reft] {engine.runtime_notes()}", file=sys.stderr)
    gen_opts = dict(patch=pset, max_tokens=a.max_tokens, temperature=a.temp, top_p=a.top_p,
                    top_k=a.top_k, seed=a.seed, stop=a.stop, min_p=a.min_p,
                    repeat_penalty=a.repeat_penalty, frequency_penalty=a.frequency_penalty,
                    presence_penalty=a.presence_penalty, penalty_last_n=a.penalty_last_n)
    system = [{"role": "system", "content": a.system}] if a.system is not None else []
    try:
        if a.chat:
            return _chat(engine, a.raw, system, gen_opts)
        if system:
            gen = engine.generate(messages=[*system, {"role": "user", "content": a.prompt}], **gen_opts)
        else:
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


def _chat(engine, raw: bool, system: list[dict], gen_opts: dict) -> int:
    if raw:
        from edge_reft.errors import ReftError
        raise ReftError("--chat uses the chat template; it cannot be combined with --raw")
    messages: list[dict] = list(system)
    print("[edge-reft] chat: /bye or Ctrl-D ends it", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if line.strip() == "/bye":
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        gen = engine.generate(messages=messages, **gen_opts)
        for piece in gen:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": gen.result.text})
    return 0
