"""Backend for any OpenAI-compatible HTTP endpoint (OpenAI, vLLM, llama.cpp server, Ollama, TGI).

The transport is plain ``aiohttp`` with a keep-alive pool: on this project's benchmark it costs about a
tenth of the CPU per request that ``httpx`` or the official SDK do (``bench/engine_bench.py``, scenario S2).
"""

from __future__ import annotations

import email.utils
import errno
import logging
import re
import socket
import time
from collections import Counter
from typing import Any

import aiohttp
import orjson

from backends.base import BackendTraits, BaseBackend
from backends.errors import (
    BackendError,
    ConfigError,
    InvalidAnswer,
    MissingLogprobs,
    NoChoiceFound,
    TransientError,
    Unreachable,
    redact,
)
from backends.openai_wire import (
    chat_body,
    chat_result,
    error_for_status,
    score_body,
    score_logprobs,
    score_result,
    usage_of,
)
from backends.options import OpenAIOptions, parse_options
from backends.registry import BackendSettings
from backends.types import ChatRequest, ChatResult, RateLimitInfo, ScoreRequest, ScoreResult, Usage

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


def _connect_cause(error: OSError | None) -> str:
    """A connection failure in a few words: "connection refused", "cannot resolve host", "timed out"…"""
    if isinstance(error, socket.gaierror):
        return "cannot resolve host"
    if error is not None and error.errno == errno.ECONNREFUSED:
        return "connection refused"
    if isinstance(error, TimeoutError) or (error is not None and error.errno == errno.ETIMEDOUT):
        return "connection timed out"
    return f"cannot connect ({(error.strerror if error is not None else None) or error or 'unknown error'})"


log = logging.getLogger("cai_async.backends")

_AT_ONCE_STATUSES = frozenset({500, 502, 503, 504})
"""Server errors sent once more at once (without ``Retry-After``): a lone failure of one worker or connection."""


class _AtOnce(Exception):
    """A failure worth one immediate resend on another pooled connection, carrying the error to raise after."""

    def __init__(self, error: BackendError) -> None:
        super().__init__(str(error))
        self.error = error


class OpenAIBackend(BaseBackend):
    """Chat and choice scoring over an OpenAI-compatible ``/v1/chat/completions`` endpoint.

    Options (``settings.options``, :class:`backends.options.OpenAIOptions`): ``top_logprobs`` (default 20),
    ``score_fallback`` (``"error"`` or ``"sample"``: sample the answer ``score_samples`` times when the endpoint
    gives no logprobs), ``prefill`` (send the score answer prefix as an assistant turn to continue, as vLLM
    allows), ``max_connections`` (default 0: unlimited; the engine bounds concurrency).
    """

    traits = BackendTraits(sends_rate_limits=True)

    def __init__(self, settings: BackendSettings) -> None:
        if not settings.base_url:
            raise ConfigError(
                f"endpoint {settings.endpoint!r}: the openai backend needs base_url "
                "(e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1)"
            )
        self.name = settings.endpoint
        self.model = settings.model
        self.resent = 0
        """Requests sent once more at once after a dropped connection or a 5xx (see ``_post``)."""
        self._settings = settings
        self._url = settings.base_url.rstrip("/") + "/chat/completions"
        self._headers = {"Content-Type": "application/json"}
        if settings.api_key:
            self._headers["Authorization"] = f"Bearer {settings.api_key.get()}"
        options = parse_options(OpenAIOptions, settings.options, backend="openai", endpoint=settings.endpoint)
        self._top_logprobs = options.top_logprobs
        self._score_fallback = options.score_fallback
        self._score_samples = options.score_samples
        self._prefill = options.prefill
        self._max_connections = options.max_connections
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
        """POST ``body``; a dropped connection or a 5xx without ``Retry-After`` is sent once more at once (the
        pool hands out another connection) before it becomes a ``TransientError`` for the engine's backoff."""
        try:
            return await self._post_once(body)
        except _AtOnce as failed:
            log.debug("retrying at once after: %s", failed.error)
        self.resent += 1
        try:
            return await self._post_once(body)
        except _AtOnce as failed:
            raise failed.error from None

    async def _post_once(self, body: dict[str, Any]) -> tuple[dict[str, Any], RateLimitInfo | None, float]:
        start = time.perf_counter()
        try:
            async with self._client().post(self._url, data=orjson.dumps(body), headers=self._headers) as resp:
                raw = await resp.read()
                status = resp.status
                headers = resp.headers
        except TimeoutError:
            cause = f"no complete answer within {self._settings.timeout_s:g}s from {self._settings.base_url} (timeout)"
            raise self._error(Unreachable, f"{cause}: the server is slow, overloaded or trickling its answer; "
                              "check it, or raise the endpoint's timeout_s", cause=cause) from None
        except aiohttp.ClientConnectorError as exc:
            cause = f"{_connect_cause(exc.os_error)} to {self._settings.base_url}"
            raise self._error(Unreachable, f"{cause}; is the server running and base_url right?", cause=cause) from None
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            raise _AtOnce(self._error(TransientError, f"connection dropped ({type(exc).__name__})")) from None
        except aiohttp.ClientError as exc:
            raise self._error(TransientError, f"HTTP client error {type(exc).__name__}: {exc}") from None
        latency = time.perf_counter() - start
        rate_limit = parse_rate_limit_headers(headers)
        if status != 200:
            if status in _AT_ONCE_STATUSES and parse_retry_after(headers) is None:
                try:
                    self._raise_for_status(status, raw, headers)
                except TransientError as exc:
                    raise _AtOnce(exc) from None
            self._raise_for_status(status, raw, headers)
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError:  # a proxy's error page, a cut body: worth retrying, maybe elsewhere
            excerpt = raw[:120].decode("utf-8", "replace")
            what = "an HTML page" if raw.lstrip()[:1] == b"<" else "a body that is not JSON"
            raise self._error(
                TransientError,
                f"answered status {status} with {what} ({excerpt!r}); a proxy or gateway error? "
                "check that base_url is an OpenAI-compatible /v1 endpoint",
                status=status,
            ) from None
        if not isinstance(payload, dict):
            raise self._error(InvalidAnswer, "answered with JSON that is not an object", status=status)
        if isinstance(payload.get("error"), dict) and "choices" not in payload:  # a 5xx in a 200's clothing
            detail = str(payload["error"].get("message", payload["error"]))[:300]
            raise self._error(TransientError, f"answered status {status} with an error body: {detail}", status=status)
        return payload, rate_limit, latency

    def _raise_for_status(self, status: int, raw: bytes, headers: Any) -> None:
        detail = raw[:300].decode("utf-8", "replace")
        try:
            parsed = orjson.loads(raw)
            if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
                detail = str(parsed["error"].get("message", detail))
        except orjson.JSONDecodeError:
            pass
        raise error_for_status(status, detail, self._error, retry_after=parse_retry_after(headers),
                               rate_limit=parse_rate_limit_headers(headers))

    async def chat(self, request: ChatRequest) -> ChatResult:
        payload, rate_limit, latency = await self._post(chat_body(self.model, request))
        return chat_result(payload, model=self.model, endpoint=self.name, latency_s=latency, make=self._error,
                           rate_limit=rate_limit)

    async def score(self, request: ScoreRequest) -> ScoreResult:
        body = score_body(self.model, request, top_logprobs=self._top_logprobs, prefill=self._prefill)
        payload, rate_limit, latency = await self._post(body)
        top = score_logprobs(payload, self._error)
        if top is None:
            if self._score_fallback == "sample":
                return await self._score_by_sampling(body, request)
            raise self._error(
                MissingLogprobs,
                "answer carries no logprobs; use an endpoint that supports logprobs/top_logprobs "
                "or set the endpoint option score_fallback: sample",
            )
        return score_result(payload, top, request, model=self.model, endpoint=self.name, latency_s=latency,
                            rate_limit=rate_limit)

    async def _score_by_sampling(self, score: dict[str, Any], request: ScoreRequest) -> ScoreResult:
        counts: Counter[str] = Counter()
        prompt_tokens = completion_tokens = 0
        latency = 0.0
        rate_limit: RateLimitInfo | None = None
        for sample in range(self._score_samples):
            body = {**score, "max_tokens": 4, "temperature": 1.0, "seed": sample}
            del body["logprobs"], body["top_logprobs"]
            payload, rate_limit, took = await self._post(body)
            latency += took
            usage = usage_of(payload)
            prompt_tokens += usage.prompt_tokens
            completion_tokens += usage.completion_tokens
            text = chat_result(payload, model=self.model, endpoint=self.name, latency_s=took, make=self._error).text
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


