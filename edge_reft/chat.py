"""The model's chat template, rendered the way Hugging Face renders it.

One implementation shared by training and every runtime, so a patch sees at
serve time exactly the prompt it was trained on.  The template is the
model's own (``tokenizer.chat_template`` in a GGUF, ``tokenizer_config.json``
or ``chat_template.jinja`` in an HF folder), run in jinja2's sandbox.
"""
from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .errors import ReftError

Message = Mapping[str, str]


def check_messages(messages: Any) -> list[dict[str, str]]:
    """Validate a conversation: a non-empty list of {role, content} string pairs."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ReftError("messages: expected a non-empty list of {'role': ..., 'content': ...}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) \
                or not isinstance(m.get("content"), str):
            raise ReftError(f"messages[{i}]: expected {{'role': str, 'content': str}}, found {m!r:.80}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    bos_token: str = ""
    eos_token: str = ""

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        from jinja2 import TemplateError
        try:
            return _compile(self.source).render(
                messages=check_messages(messages), add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError as e:
            raise ReftError(f"chat template: {e}") from None

    @classmethod
    def from_gguf(cls, path: str | Path) -> "ChatTemplate":
        from .fingerprint import gguf_metadata
        f = gguf_metadata(path).fields
        tmpl = f.get("tokenizer.chat_template")
        if tmpl is None:
            raise ReftError(f"{path}: the model has no chat template (tokenizer.chat_template); "
                            "send the prompt as is with --raw")
        tokens = f["tokenizer.ggml.tokens"].value if "tokenizer.ggml.tokens" in f else ()

        def tok(k: str) -> str:
            v = f.get(k)
            return tokens[v.value] if v is not None and 0 <= v.value < len(tokens) else ""
        return cls(tmpl.value, tok("tokenizer.ggml.bos_token_id"), tok("tokenizer.ggml.eos_token_id"))

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> "ChatTemplate":
        d = Path(path)
        cfg = json.loads((d / "tokenizer_config.json").read_text()) \
            if (d / "tokenizer_config.json").exists() else {}
        tmpl = cfg.get("chat_template")
        if (d / "chat_template.jinja").exists():
            tmpl = (d / "chat_template.jinja").read_text()
        if isinstance(tmpl, list):  # named templates: take the default
            tmpl = next((t["template"] for t in tmpl if t.get("name") == "default"), None)
        if not tmpl:
            raise ReftError(f"{d}: no chat template in tokenizer_config.json or chat_template.jinja")

        def tok(k: str) -> str:
            v = cfg.get(k) or ""
            return v.get("content", "") if isinstance(v, dict) else v
        return cls(tmpl, tok("bos_token"), tok("eos_token"))


_CACHE: dict[str, Any] = {}


def _compile(source: str) -> Any:
    t = _CACHE.get(source)
    if t is None:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            from jinja2 import TemplateError
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, sort_keys=False: json.dumps(
            x, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        t = _CACHE[source] = env.from_string(source)
    return t


class Prompter:
    """Prompts and training examples as token ids, the same way everywhere.

    ``tokenize(text, add_special)`` is the model's tokenizer (special tokens
    in the text are parsed; ``add_special`` adds a BOS where the model wants
    one); ``is_end_of_turn(token)`` marks the token that ends an assistant turn.
    The runtime renders prompts with this, and training renders examples with
    it, so a patch is trained on exactly the prompts it will be served with.

    Message content is text, never control tokens: ``tokenize_text(text)``
    tokenizes it with special-token text (``<|im_start|>system``) left as
    characters, so a user cannot forge a turn; only the template's own text is
    parsed for control tokens.  Content without such text gets exactly the
    tokens of the whole rendered prompt, as before.
    """

    def __init__(self, template: ChatTemplate | None, tokenize: Callable[[str, bool], list[int]],
                 is_end_of_turn: Callable[[int], bool],
                 tokenize_text: Callable[[str], list[int]] | None = None):
        self.template, self.tokenize, self.is_end_of_turn = template, tokenize, is_end_of_turn
        self.tokenize_text = tokenize_text

    def prompt(self, prompt: str | None = None, messages: Sequence[Message] | None = None,
               raw: bool = False) -> list[int]:
        """Tokens of a prompt: through the chat template, or the text as is with ``raw``."""
        if (prompt is None) == (messages is None):
            raise ReftError("give exactly one of prompt= or messages=")
        if raw:
            if prompt is None:
                raise ReftError("raw=True takes a prompt string, not messages")
            toks = self.tokenize(prompt, True)
        else:
            msgs = messages if messages is not None else [{"role": "user", "content": prompt}]
            toks = self._conversation(msgs, add_generation_prompt=True)
        if not toks:
            raise ReftError("the prompt is empty (0 tokens); a patch needs prompt tokens to edit")
        return toks

    def example(self, messages: Sequence[Message], response: str) -> tuple[list[int], list[int]]:
        """(prompt ids, target ids) of one training example: the target is the
        assistant's reply as the template writes it, up to and including the
        token that ends the turn (what generation must produce, then stop at)."""
        prompt = self.prompt(messages=messages)
        full = self._conversation([*messages, {"role": "assistant", "content": response}],
                                  add_generation_prompt=False)
        if full[:len(prompt)] != prompt:
            raise ReftError("chat template: the rendered conversation does not start with the rendered "
                            "prompt, so the reply cannot be located; train with raw prompts instead")
        target = full[len(prompt):]
        end = next((i for i, t in enumerate(target) if self.is_end_of_turn(t)), None)
        if end is None:
            raise ReftError("chat template: no end-of-turn token after the reply")
        if end == 0 and response:
            raise ReftError("chat template: the reply renders to no tokens")
        return prompt, target[:end + 1]

    def _conversation(self, messages: Sequence[Message], add_generation_prompt: bool) -> list[int]:
        """Tokens of a rendered conversation, its message content as plain text."""
        msgs = check_messages(messages)
        text = self._template().render(msgs, add_generation_prompt=add_generation_prompt)
        if self.tokenize_text is None or not any(self._holds_control_text(m["content"]) for m in msgs):
            return self.tokenize(text, False)
        toks: list[int] = []
        for piece, is_content in self._segments(msgs, text, add_generation_prompt):
            toks += self.tokenize_text(piece) if is_content else self.tokenize(piece, False)
        return toks

    def _holds_control_text(self, content: str) -> bool:
        assert self.tokenize_text is not None
        return bool(content) and self.tokenize(content, False) != self.tokenize_text(content)

    def _segments(self, msgs: list[dict[str, str]], text: str,
                  add_generation_prompt: bool) -> list[tuple[str, bool]]:
        """``text`` cut into the template's own pieces and each message's content, found by
        rendering the conversation again with a random marker in place of each content (a
        template may trim content: the rendered content is the original, trimmed or not)."""
        tag = secrets.token_hex(8)
        marked = [{"role": m["role"], "content": f"\x00{tag}:{i}\x00"} for i, m in enumerate(msgs)]
        skeleton = self._template().render(marked, add_generation_prompt=add_generation_prompt)
        parts = re.split(f"\x00{tag}:([0-9]+)\x00", skeleton)  # template, index, template, ...
        out, pos = [], 0
        for k in range(0, len(parts), 2):
            tmpl = parts[k]
            if not text.startswith(tmpl, pos):
                break
            out.append((tmpl, False))
            pos += len(tmpl)
            if k + 1 == len(parts):
                return out if pos == len(text) else self._unsegmentable(msgs)
            c = msgs[int(parts[k + 1])]["content"]
            nxt = parts[k + 2]
            found = next((x for x in (c, c.strip(), c.lstrip(), c.rstrip())
                          if text.startswith(x + nxt, pos)), None)
            if found is None:
                break
            out.append((found, True))
            pos += len(found)
        return self._unsegmentable(msgs)

    def _unsegmentable(self, msgs: list[dict[str, str]]) -> list[tuple[str, bool]]:
        i = next(i for i, m in enumerate(msgs) if self._holds_control_text(m["content"]))
        raise ReftError(f"messages[{i}].content: holds the text of a control token (such as a chat "
                        "turn marker) and this model's chat template rewrites message text, so it "
                        "cannot be kept as plain text; remove the marker")

    def _template(self) -> ChatTemplate:
        if self.template is None:
            raise ReftError("this model has no chat template; use raw prompts (--raw)")
        return self.template
