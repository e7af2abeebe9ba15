"""Data sets: JSON Lines to token ids, rendered exactly as the runtime renders prompts.

Each line is ``{"prompt": str, "response": str}`` or ``{"messages": [...]}``
whose last message is the assistant's reply.  The prompt goes through the
model's chat template (``edge_reft.chat.Prompter``, the runtime's own code);
the target is the reply as the template writes it, up to and including the
end-of-turn token.  The Prompter of a base model comes from
``edge_reft.runtime.prompter_for`` (for a GGUF, llama.cpp's own tokenizer).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .chat import Prompter
from .errors import ReftError
from .files import open_regular


@dataclass(frozen=True)
class Example:
    prompt: tuple[int, ...]   # prompt token ids (the chat template applied)
    target: tuple[int, ...]   # reply token ids, ending with the end-of-turn token

    @property
    def tokens(self) -> tuple[int, ...]:
        return self.prompt + self.target


def jsonl_lines(path: str | os.PathLike[str]) -> list[str]:
    """The lines of a JSON Lines file, split on "\n" only: U+2028, U+2029 and U+0085 are legal
    raw inside a JSON string (``str.splitlines`` would cut a record there)."""
    try:
        with os.fdopen(open_regular(path), "rb") as f:  # a FIFO must not block
            return f.read().decode("utf-8").split("\n")
    except OSError as e:
        raise ReftError(f"{path}: cannot be read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ReftError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def read_jsonl(path: str | os.PathLike[str]) -> list[tuple[list[dict], str]]:
    """(prompt messages, reply) per line; every malformed line is reported at once."""
    p = Path(path)
    lines = jsonl_lines(p)
    out, problems = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            problems.append(f"line {n}: not JSON ({e.msg})")
            continue
        if isinstance(rec, dict) and isinstance(rec.get("prompt"), str) and isinstance(rec.get("response"), str):
            out.append(([{"role": "user", "content": rec["prompt"]}], rec["response"]))
        elif isinstance(rec, dict) and isinstance(rec.get("messages"), list) and rec["messages"] \
                and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                        for m in rec["messages"]) and rec["messages"][-1]["role"] == "assistant" \
                and len(rec["messages"]) >= 2:
            msgs = [{"role": m["role"], "content": m["content"]} for m in rec["messages"]]
            out.append((msgs[:-1], msgs[-1]["content"]))
        else:
            problems.append(f"line {n}: expected {{\"prompt\": str, \"response\": str}} or "
                            "{\"messages\": [..., {\"role\": \"assistant\", \"content\": str}]}")
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise ReftError(f"{p}: {len(problems)} malformed lines:\n  " + "\n  ".join(shown))
    if not out:
        raise ReftError(f"{p}: no examples (expected JSON Lines with prompt/response or messages)")
    return out


def encode(records: Sequence[tuple[list[dict], str]], prompter: Prompter, max_len: int = 2048) -> list[Example]:
    examples = []
    for i, (msgs, reply) in enumerate(records):
        prompt, target = prompter.example(msgs, reply)
        if len(prompt) + len(target) > max_len:
            raise ReftError(f"example {i + 1}: {len(prompt) + len(target)} tokens, more than {max_len}")
        examples.append(Example(tuple(prompt), tuple(target)))
    return examples

