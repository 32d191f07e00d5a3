"""Request and result types shared by every backend, and the ``Backend`` protocol."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

__all__ = [
    "Backend",
    "ChatRequest",
    "ChatResult",
    "Message",
    "RateLimitInfo",
    "ScoreRequest",
    "ScoreResult",
    "Usage",
    "plain_messages",
]

Message = Mapping[str, str]
"""A chat message: ``{"role": "system"|"user"|"assistant", "content": "..."}``."""


def plain_messages(messages: Sequence[Message]) -> list[dict[str, str]]:
    """The messages as plain ``{"role", "content"}`` dicts (extra keys dropped), as sent and hashed."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


@dataclass(frozen=True, slots=True, kw_only=True)
class Usage:
    """Token usage of one call."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """One chat completion: the conversation and sampling options."""

    messages: Sequence[Message]
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def to_key(self) -> dict[str, Any]:
        """The normalized form used for cache keys (no endpoint, no secrets)."""
        return {
            "kind": "chat",
            "messages": plain_messages(self.messages),
            "max_tokens": self.max_tokens,
            "temperature": round(self.temperature, 6),
            "top_p": round(self.top_p, 6),
            "seed": self.seed,
            "stop": list(self.stop),
        }


@dataclass(frozen=True, slots=True)
class ScoreRequest:
    """Score candidate next answers (e.g. ``A``/``B``) after a conversation."""

    messages: Sequence[Message]
    choices: tuple[str, ...] = ("A", "B")
    answer_prefix: str = ""
    """Text the assistant turn starts with before the choice, e.g. ``"The answer is ("``."""

    def to_key(self) -> dict[str, Any]:
        return {
            "kind": "score",
            "messages": plain_messages(self.messages),
            "choices": list(self.choices),
            "answer_prefix": self.answer_prefix,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimitInfo:
    """What an endpoint told us of its limits (``x-ratelimit-*`` headers)."""

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_s: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatResult:
    """The answer to a :class:`ChatRequest`."""

    text: str
    finish_reason: str
    usage: Usage
    model: str = ""
    endpoint: str = ""
    latency_s: float = 0.0
    rate_limit: RateLimitInfo | None = None
    cached: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class ScoreResult:
    """Probabilities of each choice, normalized over the choices."""

    probs: dict[str, float]
    method: Literal["logprobs", "logits", "sampled"]
    usage: Usage = field(default_factory=Usage)
    model: str = ""
    endpoint: str = ""
    latency_s: float = 0.0
    rate_limit: RateLimitInfo | None = None
    cached: bool = False


@runtime_checkable
class Backend(Protocol):
    """A model backend: an async chat call and an async choice-scoring call.

    Implementations translate their own failures into :mod:`backends.errors` at this edge. Optionally (see
    :class:`backends.base.BaseBackend`, which has them all) a backend declares ``traits`` for the engine, is an
    async context manager for background work, and gives a ``summary()`` for ``summary.json``.
    """

    name: str

    async def chat(self, request: ChatRequest) -> ChatResult:
        """Complete the conversation."""
        ...

    async def score(self, request: ScoreRequest) -> ScoreResult:
        """Return the probability of each choice as the next answer."""
        ...

    async def aclose(self) -> None:
        """Release connections, threads and models."""
        ...
