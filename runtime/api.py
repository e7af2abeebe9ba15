"""Request bodies of the OpenAI-compatible API (pydantic; validated before any work)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=200_000)


class _Common(BaseModel):
    model: str | None = None
    max_tokens: int = Field(128, ge=0, le=8192)
    temperature: float = Field(1.0, ge=0.0, le=2.0)   # OpenAI's default; 0 is greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    patch: str | None = Field(None, description="a patch name in the server's patch folder")

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
