"""Request bodies of the OpenAI-compatible API (pydantic; validated before any work).

JSON as Python parses it admits ``NaN``, ``Infinity``, ``1e400`` (= inf) and
lone surrogates (``"\\ud800"``), none of which a request can mean and none of
which can be rendered back in an error: every body is checked for them first.
"""
from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_SEED = (1 << 63) - 1
MAX_STACK = 16          # patches one request may stack (model "BASE+a+b..." or a "patch" list)
MIN_TEMPERATURE = 1e-6  # below it, sampling is greedy in all but name; 0 asks for greedy itself


def body_problem(v: Any, where: str = "body", depth: int = 0) -> str | None:
    """The first non-finite number or lone surrogate in a parsed JSON value, or None."""
    if depth > 32:
        return f"{where}: nested deeper than 32 levels"
    if isinstance(v, float) and not math.isfinite(v):
        return f"{where}: a non-finite number (NaN, Infinity or out of the float range), expected a finite one"
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return f"{where}: a lone UTF-16 surrogate (\\ud800-\\udfff), expected valid Unicode text"
    if isinstance(v, dict):
        for k, x in v.items():
            p = body_problem(k, where, depth + 1) or body_problem(x, f"{where}.{k}", depth + 1)
            if p:
                return p
    if isinstance(v, list):
        for i, x in enumerate(v):
            p = body_problem(x, f"{where}[{i}]", depth + 1)
            if p:
                return p
    return None


class _Strict(BaseModel):
    # a field edge-reft does not know is refused by name, never silently ignored
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: str
    text: str = Field("", max_length=200_000)

    @model_validator(mode="after")
    def _text_only(self) -> "TextPart":
        if self.type != "text":
            raise ValueError(f"content part type {self.type!r:.40} is not supported (text only)")
        return self


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] = Field(max_length=200_000)
    name: str | None = Field(None, max_length=64)   # OpenAI's participant name; not rendered

    def as_dict(self) -> dict[str, str]:
        """The message as the chat template takes it: parts joined, developer as system."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    model: str | None = Field(None, max_length=1024, description='"NAME", "BASE+NAME" or "BASE" (no patch)')
    max_tokens: int | None = Field(None, ge=0, le=8192)
    max_completion_tokens: int | None = Field(None, ge=0, le=8192)
    temperature: float = Field(1.0, ge=0.0, le=2.0)   # OpenAI's default; 0 is greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)                        # vLLM's extension; 0 = off
    min_p: float = Field(0.0, ge=0.0, le=1.0)          # vLLM's extension; 0 = off
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)   # vLLM's name for llama.cpp's repeat penalty
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=128)
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    user: str | None = Field(None, max_length=256)     # the caller's end-user id; no effect
    patch: str | list[str] | None = Field(None, description="patch name(s) in the server's patch folder")

    @field_validator("patch")
    @classmethod
    def _few_patches(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > MAX_STACK:
            raise ValueError(f"patch: {len(v)} patches stacked, at most {MAX_STACK}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _finite_and_unicode(cls, data: Any) -> Any:
        problem = body_problem(data)
        if problem:
            raise ValueError(problem)
        return data

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float) -> float:
        if 0 < v < MIN_TEMPERATURE:
            raise ValueError(f"temperature {v:.3g} is below {MIN_TEMPERATURE:g}: use 0 for greedy decoding")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(len(s) > 256 for s in stops):
            raise ValueError("at most 4 stop strings of at most 256 characters")
        return v

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def limit(self) -> int:
        """The most tokens to generate: max_completion_tokens, else max_tokens, else 128."""
        for v in (self.max_completion_tokens, self.max_tokens):
            if v is not None:
                return v
        return 128

    def unsupported(self) -> tuple[str, str] | None:
        """(parameter, why) for the first thing asked for that edge-reft cannot do, or None."""
        if self.n != 1:
            return "n", "only n=1 is supported (send the request again for more choices)"
        if self.logprobs or self.top_logprobs:
            return "logprobs", "log probabilities are not supported"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        if self.response_format and self.response_format.get("type") != "text":
            return "response_format", "only response_format {\"type\": \"text\"} is supported"
        if self.tools or self.tool_choice not in (None, "none"):
            return "tools", "tool calls are not supported"
        return None

    def sampling(self) -> dict[str, Any]:
        """The engine's sampling keywords for this request."""
        return dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed,
                    min_p=self.min_p, repeat_penalty=self.repetition_penalty,
                    frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Common):
    prompt: str = Field(min_length=1, max_length=200_000)
    echo: bool = False

    def unsupported(self) -> tuple[str, str] | None:
        if self.echo:
            return "echo", "echo is not supported"
        return super().unsupported()


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1, max_length=512)


def patch_names(req: _Common, base_id: str) -> tuple[list[str], bool]:
    """The patches a request asks for, and whether its ``model`` named them: ``"model":
    "alice"`` or ``"BASE+alice"`` (``+`` stacks more), or ``"patch"`` (a name or a list);
    both may be given only if they agree.  ``"model": "BASE"`` (or none) is no patch."""
    from_model: list[str] = []
    if req.model and req.model != base_id:
        parts = req.model.split("+", MAX_STACK + 1)
        from_model = parts[1:] if parts[0] == base_id else parts
        if len(from_model) > MAX_STACK:
            raise ValueError(f"model {req.model!r:.80}: {req.model.count('+') + (parts[0] != base_id)} "
                             f"patches stacked, at most {MAX_STACK}")
    given = [req.patch] if isinstance(req.patch, str) else list(req.patch or [])
    if from_model and given and from_model != given:
        raise ValueError(f"model {req.model!r:.80} and patch {req.patch!r:.80} name different patches; give one")
    return (given or from_model), bool(from_model) and not given
