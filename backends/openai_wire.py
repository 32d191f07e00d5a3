"""The OpenAI chat-completions wire format: request bodies and answer parsing, shared by the online
(``openai``) and the Batch API (``openai-batch``) backends so both send and read exactly the same thing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from backends.errors import (
    AuthenticationFailed,
    BackendError,
    InvalidAnswer,
    PermanentError,
    RateLimited,
    TransientError,
)
from backends.scoring import normalize_choice_logprobs
from backends.types import ChatRequest, ChatResult, RateLimitInfo, ScoreRequest, ScoreResult, Usage, plain_messages

__all__ = [
    "ErrorFactory",
    "chat_body",
    "chat_result",
    "error_for_status",
    "score_body", "score_logprobs", "score_result", "usage_of"]

ErrorFactory = Callable[..., BackendError]
"""``make(cls, message, **kwargs)``: builds an error carrying the endpoint's name (and redacted)."""


def chat_body(model: str, request: ChatRequest) -> dict[str, Any]:
    """The ``/v1/chat/completions`` body for a chat request."""
    body: dict[str, Any] = {
        "model": model,
        "messages": plain_messages(request.messages),
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
    }
    if request.seed is not None:
        body["seed"] = request.seed
    if request.stop:
        body["stop"] = list(request.stop)
    return body


def score_body(model: str, request: ScoreRequest, *, top_logprobs: int, prefill: bool) -> dict[str, Any]:
    """The body that asks for the next token's ``top_logprobs`` after the conversation (and, with
    ``prefill``, after the answer prefix sent as an assistant turn to continue, as vLLM allows)."""
    messages = plain_messages(request.messages)
    extra: dict[str, Any] = {}
    if request.answer_prefix and prefill:
        messages.append({"role": "assistant", "content": request.answer_prefix})
        extra = {"continue_final_message": True, "add_generation_prompt": False}
    return {
        "model": model,
        "messages": messages,
        "max_tokens": 1,
        "temperature": 0.0,
        "logprobs": True,
        "top_logprobs": top_logprobs,
        **extra,
    }


def usage_of(payload: dict[str, Any]) -> Usage:
    """Token usage of an answer (zeros when the server does not say)."""
    usage = payload.get("usage") or {}
    return Usage(
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
    )


def error_for_status(
    status: int,
    detail: str,
    make: ErrorFactory,
    *,
    retry_after: float | None = None,
    rate_limit: RateLimitInfo | None = None,
) -> BackendError:
    """The error an HTTP status means: 429 rate limited; 408/409/5xx transient (retried); other 4xx permanent."""
    if status == 429:
        return make(RateLimited, f"rate limited (429): {detail}", status=status, retry_after=retry_after,
                    rate_limit=rate_limit)
    if status in (401, 403):
        return make(
            AuthenticationFailed,
            f"authentication failed ({status}); check the API key in the endpoint's api_key_env variable",
            status=status,
        )
    if status == 404:
        return make(PermanentError, f"not found (404): {detail}; check base_url and the model name", status=status)
    if status in (408, 409) or status >= 500:
        return make(TransientError, f"server error {status}: {detail}", status=status)
    return make(PermanentError, f"request rejected ({status}): {detail}", status=status)


def _first_choice(payload: dict[str, Any], make: ErrorFactory) -> dict[str, Any]:
    choices = payload.get("choices")
    if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
        raise make(InvalidAnswer, "answer has no choices; the endpoint may not support this model")
    choice: dict[str, Any] = choices[0]
    return choice


def chat_result(
    payload: dict[str, Any],
    *,
    model: str,
    endpoint: str,
    latency_s: float,
    make: ErrorFactory,
    rate_limit: RateLimitInfo | None = None,
) -> ChatResult:
    """A :class:`ChatResult` from a chat-completion answer."""
    choice = _first_choice(payload, make)
    text = (choice.get("message") or {}).get("content")
    if not isinstance(text, str):
        raise make(InvalidAnswer, "answer's first choice has no message content")
    return ChatResult(
        text=text,
        finish_reason=str(choice.get("finish_reason") or "stop"),
        usage=usage_of(payload),
        model=str(payload.get("model") or model),
        endpoint=endpoint,
        latency_s=latency_s,
        rate_limit=rate_limit,
    )


def score_logprobs(payload: dict[str, Any], make: ErrorFactory) -> dict[str, float] | None:
    """The first generated token's ``top_logprobs`` as ``{token: logprob}``, or ``None`` when absent."""
    content = ((_first_choice(payload, make).get("logprobs") or {}).get("content")) or []
    if not content or not content[0].get("top_logprobs"):
        return None
    return {str(entry["token"]): float(entry["logprob"]) for entry in content[0]["top_logprobs"]}


def score_result(
    payload: dict[str, Any],
    top: dict[str, float],
    request: ScoreRequest,
    *,
    model: str,
    endpoint: str,
    latency_s: float,
    rate_limit: RateLimitInfo | None = None,
) -> ScoreResult:
    """A :class:`ScoreResult` from an answer whose ``top_logprobs`` were read by :func:`score_logprobs`."""
    return ScoreResult(
        probs=normalize_choice_logprobs(top, request.choices, endpoint=endpoint),
        method="logprobs",
        usage=usage_of(payload),
        model=str(payload.get("model") or model),
        endpoint=endpoint,
        latency_s=latency_s,
        rate_limit=rate_limit,
    )
