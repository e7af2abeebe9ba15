"""The model's chat template, rendered the way Hugging Face renders it.

One implementation shared by training and every runtime, so a patch sees at
serve time exactly the prompt it was trained on.  The template is the
model's own (``tokenizer.chat_template`` in a GGUF, ``tokenizer_config.json``
or ``chat_template.jinja`` in an HF folder), run in jinja2's sandbox.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

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
