"""Request and response schemas in the shapes of OpenAI's API (what its SDK sends and expects).

Parameters that OpenAI defines but loraforge cannot honour are accepted only at their neutral
value, so that a client never silently gets a different behaviour than it asked for.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_CHOICES = 4
MAX_STOP = 4
MAX_STOP_CHARS = 256
MAX_TOP_LOGPROBS = 20
SEED_LIMIT = 2**63  # seeds are signed 64-bit integers


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str = Field(min_length=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=SEED_LIMIT)
    user: str | None = None  # the end user's id (stored only as a hash): pilot arms, feedback groups
    min_tokens: int = Field(default=0, ge=0)  # vLLM's extension: no end of turn before this many tokens
    # Accepted only at their neutral values (see the module docstring).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed, got {len(v)}")
        for stop in [v] if isinstance(v, str) else v or []:
            if len(stop) > MAX_STOP_CHARS:
                raise ValueError(f"a stop sequence may have at most {MAX_STOP_CHARS} characters, got {len(stop)}")
        return v

    @model_validator(mode="after")
    def _neutral(self) -> _Sampling:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0.0:
                raise ValueError(f"{name} is not supported by this server; omit it or send 0")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported by this server; omit it")
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5)
    suffix: None = None
    best_of: int | None = Field(default=None, ge=1, le=1)

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ValueError("prompt is empty")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    parent: str | None = None
    root: str
    # For admin keys only: exceptions to data governance taken in training, and why a public
    # adapter was published without a passed governance record.
    governance_flags: list[str] | None = None
    governance_override: str | None = None
    state: str | None = None  # the release state (admins)
    adapter: str | None = None  # the adapter a route serves now (admins)
    # why it was approved although its evaluation failed the release gate: shown to everyone who sees it
    release_override: str | None = None

    def to_json(self) -> dict[str, Any]:
        """OpenAI's model object; loraforge's fields only where they say something (governance: admins)."""
        extra = ("state", "adapter", "release_override")
        body = self.model_dump(exclude={"governance_flags", "governance_override", *extra})
        if self.governance_flags is not None:
            body.update(governance_flags=self.governance_flags, governance_override=self.governance_override)
        body.update({k: getattr(self, k) for k in extra if getattr(self, k) is not None})
        return body


class LoadRequest(_Strict):
    name: str


def chat_logprob_entry(token: str, logprob: float, top: list[tuple[str, float]] | None) -> dict[str, Any]:
    """One entry of ``choices[].logprobs.content`` in a chat completion."""
    return {
        "token": token,
        "logprob": logprob,
        "bytes": list(token.encode()),
        "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in (top or [])],
    }
