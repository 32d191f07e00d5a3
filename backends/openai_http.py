"""Backend for any OpenAI-compatible HTTP endpoint (OpenAI, vLLM, llama.cpp server, Ollama, TGI).

The transport is plain ``aiohttp`` with a keep-alive pool: on this project's benchmark it costs about a
tenth of the CPU per request that ``httpx`` or the official SDK do (``bench/engine_bench.py``, scenario S2).
"""

from __future__ import annotations

import email.utils
import re
import time
from collections import Counter
from typing import Any

import aiohttp
import orjson

from backends.errors import (
    BackendError,
    ConfigError,
    NoChoiceFound,
    PermanentError,
    RateLimited,
    TransientError,
    redact,
)
from backends.registry import BackendSettings
from backends.scoring import normalize_choice_logprobs
from backends.types import (
    ChatRequest,
    ChatResult,
    RateLimitInfo,
    ScoreRequest,
    ScoreResult,
    Usage,
    plain_messages,
)

__all__ = ["OpenAIBackend", "parse_duration", "parse_rate_limit_headers", "parse_retry_after"]

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(text: str | None) -> float | None:
    """Parse OpenAI's reset durations (``"1s"``, ``"6m0s"``, ``"20ms"``, ``"0.5"``) into seconds."""
    if not text:
        return None
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    parts = _DURATION_PART.findall(text)
    if not parts:
        return None
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(value) * scale[unit] for value, unit in parts)


def parse_retry_after(headers: Any) -> float | None:
    """Seconds to wait from ``retry-after-ms`` / ``Retry-After`` (seconds or an HTTP date)."""
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        if parsed is None:
            return None
        return max(0.0, parsed.timestamp() - time.time())


def _int_header(headers: Any, name: str) -> int | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        return int(float(value))
    except ValueError:
        return None


def parse_rate_limit_headers(headers: Any) -> RateLimitInfo | None:
    """Read ``x-ratelimit-*`` headers; ``None`` when the endpoint sends none."""
    limit_requests = _int_header(headers, "x-ratelimit-limit-requests")
    limit_tokens = _int_header(headers, "x-ratelimit-limit-tokens")
    if limit_requests is None and limit_tokens is None:
        return None
    return RateLimitInfo(
        limit_requests=limit_requests,
        remaining_requests=_int_header(headers, "x-ratelimit-remaining-requests"),
        reset_requests_s=parse_duration(headers.get("x-ratelimit-reset-requests")),
        limit_tokens=limit_tokens,
        remaining_tokens=_int_header(headers, "x-ratelimit-remaining-tokens"),
        reset_tokens_s=parse_duration(headers.get("x-ratelimit-reset-tokens")),
    )


class OpenAIBackend:
    """Chat and choice scoring over an OpenAI-compatible ``/v1/chat/completions`` endpoint.

    Options (``settings.options``): ``top_logprobs`` (default 20), ``score_fallback`` (``"error"`` or
    ``"sample"``: sample the answer ``score_samples`` times when the endpoint gives no logprobs),
    ``prefill`` (send the score answer prefix as an assistant turn to continue, as vLLM allows),
    ``max_connections`` (default 0: unlimited; the engine bounds concurrency).
    """

    def __init__(self, settings: BackendSettings) -> None:
        if not settings.base_url:
            raise ConfigError(
                f"endpoint {settings.endpoint!r}: the openai backend needs base_url "
                "(e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1)"
            )
        self.name = settings.endpoint
        self.model = settings.model
        self._settings = settings
        self._url = settings.base_url.rstrip("/") + "/chat/completions"
        self._headers = {"Content-Type": "application/json"}
        if settings.api_key:
            self._headers["Authorization"] = f"Bearer {settings.api_key.get()}"
        options = settings.options
        self._top_logprobs = int(options.get("top_logprobs", 20))
        self._score_fallback = str(options.get("score_fallback", "error"))
        self._score_samples = int(options.get("score_samples", 8))
        self._prefill = bool(options.get("prefill", False))
        self._max_connections = int(options.get("max_connections", 0))
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"OpenAIBackend(endpoint={self.name!r}, base_url={self._settings.base_url!r}, model={self.model!r})"

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=60.0)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self._settings.timeout_s),
                json_serialize=lambda obj: orjson.dumps(obj).decode(),
                trust_env=False,
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()

    def _error(self, cls: type[BackendError], message: str, **kwargs: Any) -> BackendError:
        text = redact(f"endpoint {self.name!r} ({self._settings.base_url}): {message}", [self._settings.api_key.get()])
        return cls(text, endpoint=self.name, **kwargs)

    async def _post(self, body: dict[str, Any]) -> tuple[dict[str, Any], RateLimitInfo | None, float]:
        start = time.perf_counter()
        try:
            async with self._client().post(self._url, data=orjson.dumps(body), headers=self._headers) as resp:
                raw = await resp.read()
                status = resp.status
                headers = resp.headers
        except TimeoutError:
            raise self._error(TransientError, f"no answer within {self._settings.timeout_s:g}s (timeout)") from None
        except aiohttp.ClientConnectorError as exc:
            raise self._error(
                TransientError, f"cannot connect ({exc.os_error or exc}); is the server running and base_url right?"
            ) from None
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            raise self._error(TransientError, f"connection dropped ({type(exc).__name__})") from None
        except aiohttp.ClientError as exc:
            raise self._error(TransientError, f"HTTP client error {type(exc).__name__}: {exc}") from None
        latency = time.perf_counter() - start
        rate_limit = parse_rate_limit_headers(headers)
        if status != 200:
            self._raise_for_status(status, raw, headers)
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError:
            excerpt = raw[:120].decode("utf-8", "replace")
            raise self._error(
                PermanentError,
                f"answered with invalid JSON ({excerpt!r}); is base_url an OpenAI-compatible /v1 endpoint?",
                status=status,
            ) from None
        if not isinstance(payload, dict):
            raise self._error(PermanentError, "answered with JSON that is not an object", status=status)
        return payload, rate_limit, latency

    def _raise_for_status(self, status: int, raw: bytes, headers: Any) -> None:
        detail = raw[:300].decode("utf-8", "replace")
        try:
            parsed = orjson.loads(raw)
            if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
                detail = str(parsed["error"].get("message", detail))
        except orjson.JSONDecodeError:
            pass
        if status == 429:
            raise self._error(
                RateLimited, f"rate limited (429): {detail}", status=status, retry_after=parse_retry_after(headers)
            )
        if status in (401, 403):
            raise self._error(
                PermanentError,
                f"authentication failed ({status}); check the API key in the endpoint's api_key_env variable",
                status=status,
            )
        if status == 404:
            raise self._error(
                PermanentError, f"not found (404): {detail}; check base_url and the model name", status=status
            )
        if status in (408, 409) or status >= 500:
            raise self._error(TransientError, f"server error {status}: {detail}", status=status)
        raise self._error(PermanentError, f"request rejected ({status}): {detail}", status=status)

    @staticmethod
    def _usage(payload: dict[str, Any]) -> Usage:
        usage = payload.get("usage") or {}
        return Usage(
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
        )

    def _first_choice(self, payload: dict[str, Any]) -> dict[str, Any]:
        choices = payload.get("choices")
        if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
            raise self._error(PermanentError, "answer has no choices; the endpoint may not support this model")
        choice: dict[str, Any] = choices[0]
        return choice

    async def chat(self, request: ChatRequest) -> ChatResult:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": plain_messages(request.messages),
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
        }
        if request.seed is not None:
            body["seed"] = request.seed
        if request.stop:
            body["stop"] = list(request.stop)
        payload, rate_limit, latency = await self._post(body)
        choice = self._first_choice(payload)
        message = choice.get("message") or {}
        text = message.get("content")
        if not isinstance(text, str):
            raise self._error(PermanentError, "answer's first choice has no message content")
        return ChatResult(
            text=text,
            finish_reason=str(choice.get("finish_reason") or "stop"),
            usage=self._usage(payload),
            model=str(payload.get("model") or self.model),
            endpoint=self.name,
            latency_s=latency,
            rate_limit=rate_limit,
        )

    def _score_messages(self, request: ScoreRequest) -> tuple[list[dict[str, str]], dict[str, Any]]:
        messages = plain_messages(request.messages)
        extra: dict[str, Any] = {}
        if request.answer_prefix and self._prefill:
            messages.append({"role": "assistant", "content": request.answer_prefix})
            extra = {"continue_final_message": True, "add_generation_prompt": False}
        return messages, extra

    async def score(self, request: ScoreRequest) -> ScoreResult:
        messages, extra = self._score_messages(request)
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": True,
            "top_logprobs": self._top_logprobs,
            **extra,
        }
        payload, rate_limit, latency = await self._post(body)
        choice = self._first_choice(payload)
        content = ((choice.get("logprobs") or {}).get("content")) or []
        if not content or not content[0].get("top_logprobs"):
            if self._score_fallback == "sample":
                return await self._score_by_sampling(messages, request, extra)
            raise self._error(
                PermanentError,
                "answer carries no logprobs; use an endpoint that supports logprobs/top_logprobs "
                "or set the endpoint option score_fallback: sample",
            )
        top = {str(entry["token"]): float(entry["logprob"]) for entry in content[0]["top_logprobs"]}
        return ScoreResult(
            probs=normalize_choice_logprobs(top, request.choices, endpoint=self.name),
            method="logprobs",
            usage=self._usage(payload),
            model=str(payload.get("model") or self.model),
            endpoint=self.name,
            latency_s=latency,
            rate_limit=rate_limit,
        )

    async def _score_by_sampling(
        self, messages: list[dict[str, str]], request: ScoreRequest, extra: dict[str, Any]
    ) -> ScoreResult:
        counts: Counter[str] = Counter()
        prompt_tokens = completion_tokens = 0
        latency = 0.0
        rate_limit: RateLimitInfo | None = None
        for sample in range(self._score_samples):
            body = {
                "model": self.model,
                "messages": messages,
                "max_tokens": 4,
                "temperature": 1.0,
                "seed": sample,
                **extra,
            }
            payload, rate_limit, took = await self._post(body)
            latency += took
            usage = self._usage(payload)
            prompt_tokens += usage.prompt_tokens
            completion_tokens += usage.completion_tokens
            text = str((self._first_choice(payload).get("message") or {}).get("content") or "")
            answer = text.strip().lstrip("(").strip()[:1]
            if answer in request.choices:
                counts[answer] += 1
        total = sum(counts.values())
        if total == 0:
            raise self._error(NoChoiceFound, f"none of {self._score_samples} sampled answers named a choice")
        return ScoreResult(
            probs={c: counts[c] / total for c in request.choices},
            method="sampled",
            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens),
            model=self.model,
            endpoint=self.name,
            latency_s=latency,
            rate_limit=rate_limit,
        )


