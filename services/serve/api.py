"""Request bodies of the OpenAI-compatible API (pydantic; validated before any work).

JSON as Python parses it admits ``NaN``, ``Infinity``, ``1e400`` (= inf) and
lone surrogates (``"\\ud800"``), none of which a request can mean and none of
which can be rendered back in an error: every body is checked for them first.
"""
from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

MAX_SEED = (1 << 63) - 1
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


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=200_000)


class _Common(BaseModel):
    model: str | None = None
    max_tokens: int = Field(128, ge=0, le=8192)
    temperature: float = Field(1.0, ge=0.0, le=2.0)   # OpenAI's default; 0 is greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    stream: bool = False
    patch: str | None = Field(None, description="a patch name in the server's patch folder")

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


class CompletionRequest(_Common):
    prompt: str = Field(min_length=1, max_length=200_000)


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1, max_length=512)
