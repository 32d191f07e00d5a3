"""Backend for any OpenAI-compatible HTTP endpoint (OpenAI, vLLM, llama.cpp server, Ollama, TGI).

The transport is plain ``aiohttp`` with a keep-alive pool: on this project's benchmark it costs about a
tenth of the CPU per request that ``httpx`` or the official SDK do (``bench/engine_bench.py``, scenario S2).
"""

from __future__ import annotations

import asyncio
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
    BrokenAnswer,
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
from backends.scoring import sampled_choice
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

_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)
_TAG = re.compile(r"<[^>]*>")


def _html_gist(page: str) -> str:
    """An HTML page in a few words: its title, else the start of its text."""
    found = _TITLE.search(page)
    text = found.group(1) if found else _TAG.sub(" ", page)
    return " ".join(text.split())[:80] or page.strip()[:80]


def _progress(resp: aiohttp.ClientResponse) -> tuple[int, int | None]:
    """Bytes of a body read so far, and of how many its ``Content-Length`` announced (``None`` when it announced
    none, or when the body is compressed: aiohttp counts the bytes it unpacked)."""
    expected = None if resp.headers.get("Content-Encoding") else resp.content_length
    return resp.content.total_bytes, expected


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
            self._headers["Authorization"] = f"Bearer {settings.api_key.get_secret_value()}"
        options = parse_options(OpenAIOptions, settings.options, backend="openai", endpoint=settings.endpoint)
        self._top_logprobs = options.top_logprobs
        self._score_fallback = options.score_fallback
        self._score_samples = options.score_samples
        self._prefill = options.prefill
        self._max_connections = options.max_connections
        self._slow_body_s = options.slow_body_s
        self._slow_said = 0.0
        """When a trickling body was last said (``time.monotonic()``; 0: never)."""
        self._slow_healed = False
        """Whether an answer came whole within ``slow_body_s`` since then."""
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
        text = redact(f"endpoint {self.name!r} ({self._settings.base_url}): {message}",
                      [self._settings.api_key.get_secret_value()])
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
        resp: aiohttp.ClientResponse | None = None
        try:
            async with self._client().post(self._url, data=orjson.dumps(body), headers=self._headers) as resp:
                status = resp.status
                headers = resp.headers
                raw = await self._read(resp)
        except TimeoutError:
            raise self._timed_out(resp) from None
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
        except orjson.JSONDecodeError as exc:  # a proxy's page, corrupted bytes: the endpoint, not this call
            raise self._broken(raw, status, headers.get("Content-Type", ""), exc) from None
        if not isinstance(payload, dict):
            raise self._error(InvalidAnswer, "answered with JSON that is not an object", status=status)
        if isinstance(payload.get("error"), dict) and "choices" not in payload:  # a 5xx in a 200's clothing
            detail = str(payload["error"].get("message", payload["error"]))[:300]
            raise self._error(TransientError, f"answered status {status} with an error body: {detail}", status=status)
        return payload, rate_limit, latency

    async def _read(self, resp: aiohttp.ClientResponse) -> bytes:
        """The whole body; one still coming ``slow_body_s`` after the headers is said once (a trickling server),
        and one the connection cuts short of its ``Content-Length`` is a :class:`BrokenAnswer` saying so."""
        began = time.monotonic()
        watch = asyncio.get_running_loop().call_later(self._slow_body_s, self._slow_body, resp)
        try:
            raw = await resp.read()
        except aiohttp.ClientPayloadError as exc:
            raise self._cut_short(resp, exc) from None
        finally:
            watch.cancel()
        if self._slow_said and time.monotonic() - began < self._slow_body_s:
            self._slow_healed = True  # a whole body in time again: a later trickle is said again
        return raw

    def _slow_body(self, resp: aiohttp.ClientResponse) -> None:
        """Say that a body is trickling: once, and again only after an answer came whole in time and a minute
        has passed (a server that trickles now and then gets a line a minute at most)."""
        now = time.monotonic()
        if self._slow_said and not (self._slow_healed and now - self._slow_said >= 60.0):
            return
        self._slow_said, self._slow_healed = now, False
        received, expected = _progress(resp)
        of = f" of {expected}" if expected is not None else ""
        timeout = self._settings.timeout_s
        giving_up = "check the server, or lower timeout_s to give up on it sooner"
        if expected and received:
            needs = self._slow_body_s * expected / received
            outlook = (f"at this pace it needs ~{needs:.0f} s, so it will time out: {giving_up}" if needs > timeout
                       else f"at this pace it needs ~{needs:.0f} s: slow, but in time")
        else:
            outlook = f"a server trickling its answers? {giving_up}"
        log.warning("%s", redact(
            f"endpoint {self.name} ({self._settings.base_url}) has sent only {received}{of} bytes of an answer in "
            f"{self._slow_body_s:g} s; it is given timeout_s={timeout:g} s per call ({outlook})",
            [self._settings.api_key.get_secret_value()]))

    def _timed_out(self, resp: aiohttp.ClientResponse | None) -> BackendError:
        timeout = self._settings.timeout_s
        cause = f"no complete answer within {timeout:g}s from {self._settings.base_url} (timeout)"
        if resp is not None and resp.content.total_bytes:
            received, expected = _progress(resp)
            of = f" of {expected}" if expected is not None else ""
            cause += f": only {received}{of} bytes of its body came"
        return self._error(Unreachable, f"{cause}; the server is slow, overloaded or trickling its answer: check "
                           "it, or raise the endpoint's timeout_s", cause=cause)

    def _cut_short(self, resp: aiohttp.ClientResponse, error: aiohttp.ClientPayloadError) -> BackendError:
        """A body the connection ended before its ``Content-Length`` (or last chunk), or one that cannot be
        unpacked (its ``Content-Encoding``)."""
        received, expected = _progress(resp)
        if "not completed" not in str(error):  # e.g. a gzip body that does not unpack
            cause = f"the body could not be read: {error}"
            return self._error(BrokenAnswer, cause, cause=cause, status=resp.status)
        if expected is not None:
            cause = f"the body was cut short: {received} of {expected} bytes"
        else:
            packed = resp.headers.get("Content-Encoding")
            cause = f"the body was cut short after {received} bytes" + (f" (unpacked from {packed})" if packed else "")
        return self._error(BrokenAnswer, f"{cause} (the connection closed before its end; the server or a proxy "
                           "in between drops its answers)", cause=cause, status=resp.status)

    def _broken(self, raw: bytes, status: int, content_type: str, error: orjson.JSONDecodeError) -> BackendError:
        """What a body that is not JSON is, said in a few words: an HTML page, bytes that are not UTF-8, empty."""
        hint = "check that base_url is the OpenAI-compatible /v1 endpoint itself"
        text = raw.decode("utf-8", "replace")
        if "html" in content_type.lower() or raw.lstrip()[:1] == b"<":
            cause = f"answered an HTML page with status {status}: {_html_gist(text)!r}"
            message = f"{cause} (a proxy, gateway or login page in front of the server?); {hint}"
        elif not raw.strip():
            cause = f"answered status {status} with an empty body"
            message = f"{cause}; {hint}"
        else:
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as bad:
                cause = f"the body is not valid UTF-8 at byte {bad.start}"
                around = raw[max(0, bad.start - 24):bad.start + 8]
                message = (f"{cause} of {len(raw)} ({around!r}); the server or a proxy in between corrupts its "
                           "answers")
            else:
                cause = f"answered status {status} with a body that is not JSON: {text[:60]!r}"
                message = f"{cause} ({error}); {hint}"
        return self._error(BrokenAnswer, message, cause=cause, status=status)

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
            body = {**score, "max_tokens": 8, "temperature": 1.0, "seed": sample}  # "The answer is (A)" fits
            del body["logprobs"], body["top_logprobs"]
            payload, rate_limit, took = await self._post(body)
            latency += took
            usage = usage_of(payload)
            prompt_tokens += usage.prompt_tokens
            completion_tokens += usage.completion_tokens
            text = chat_result(payload, model=self.model, endpoint=self.name, latency_s=took, make=self._error).text
            answer = sampled_choice(text, request.choices)  # strict: "Answer…" or "As an AI" name no choice
            if answer is not None:
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


