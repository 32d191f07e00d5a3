"""An OpenAI-compatible test server with fault injection, for tests and bench/.

Real HTTP on 127.0.0.1 (aiohttp). Deterministic answers; configurable latency; RPM/TPM limits answered by
429 with ``Retry-After`` and ``x-ratelimit-*`` headers; 5xx answers and dropped connections at given
rates; ``logprobs``/``top_logprobs`` for choice scoring, with an optional planted preference.

Per-request faults are planted with markers in the last user message: ``@@status:NNN@@``,
``@@malformed@@``, ``@@nochoices@@``, ``@@empty@@``, ``@@nologprobs@@``, ``@@drop@@``, ``@@html@@``,
``@@error200@@`` (an error body with status 200), ``@@truncate@@`` (a body cut short: the connection closes
before ``Content-Length`` is reached), ``@@badutf8@@`` (invalid UTF-8 inside the JSON).
Whole-server faults (switched at run time, so a rerun can find them healed): ``retry_after_s`` (every call
429 with that ``Retry-After``), ``trickle_s`` (bodies sent a few bytes at a time over that long), ``html``
(a proxy's HTML page with status 200), ``truncate`` and ``bad_utf8`` (as the markers), ``nochoices``,
``logprobs: false``, ``dead`` (connections dropped). ``hold_after``: let that many chat calls through (counted
since the last reset, ``admitted`` in ``/stats``), then hold every later one unanswered (``held`` in ``/stats``) until
it is set to 0 or raised; a held call whose client hangs up is dropped, never answered (a test kills a process at a
known point: once its calls are held, it cannot finish first).

Run: ``python -m tests.server --port 0 --latency-ms 200`` (prints ``PORT <n>`` when ready).
The Batch API (``/v1/files``, ``/v1/batches``) follows OpenAI's documented behaviour: see
:mod:`tests.server_batches`.

Control: ``GET /stats``, ``POST /reset``, ``POST /config`` (JSON with any :class:`ServerConfig` field).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import hashlib
import logging
import math
import random
import re
import sys
import time
from collections import Counter
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

import orjson
from aiohttp import web

from tests.server_batches import add_batch_routes

__all__ = ["ServerConfig", "build_app", "main"]

_MARKER = re.compile(r"@@(\w+)(?::(\d+))?@@")


@dataclass
class ServerConfig:
    """Behaviour of the test server; every field can be changed at run time through ``POST /config``."""

    latency_ms: float = 0.0
    rpm: int = 0
    tpm: int = 0
    send_rate_headers: bool = True
    error_rate: float = 0.0
    drop_rate: float = 0.0
    api_key: str = ""
    prefer: str = ""  # "A" or "B": plant a position preference in logprobs
    seed: int = 0
    model: str = "test-model"
    record: bool = False  # keep every request body's messages, served at GET /requests
    reply: str = ""  # a fixed chat answer (e.g. a chain-of-thought ending "The answer is (A)")
    # planted answers by rule, the first that matches wins (else `reply`, else the deterministic text): each rule
    # {"reply": TEXT} with any of "last" (a substring of the last message), "first" (of the first user message),
    # "seed" (the request's seed), "base64": true (the last message holds base64 text: a planted weakness),
    # "min_user_turns": N (the conversation has at least N user turns)
    replies: list[dict[str, Any]] = field(default_factory=list)
    prefer_when: dict[str, str] = field(default_factory=dict)  # substring of the prompt → preferred choice
    stream_chunk_ms: float = 0.0  # with "stream": true, the pause before each word's chunk
    fail_status: int = 0  # answer every chat request with this status (e.g. 404: a model the server lacks)
    retry_after_s: float = 0.0  # > 0: answer every chat request 429 with this Retry-After
    trickle_s: float = 0.0  # > 0: send each answer's body a few bytes at a time over this many seconds
    html: bool = False  # answer with a proxy's HTML error page, status 200
    truncate: bool = False  # send part of each answer's body, then close (Content-Length larger than what is sent)
    bad_utf8: bool = False  # answer JSON with an invalid UTF-8 byte inside the message text
    nochoices: bool = False  # answer JSON without choices (an invalid answer)
    logprobs: bool = True  # False: never send logprobs (an endpoint without them)
    dead: bool = False  # drop every connection without answering
    choices: list[str] = field(default_factory=list)  # fixed texts, one per choice (an answer with n choices)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # [{name, arguments}]: answer with tool calls
    echo_auth: bool = False  # answer 401 quoting the Authorization header received (a leaky upstream)
    answer_json: Any = None  # answer this JSON, whatever it is, with status 200 (e.g. a list)
    bad_stream_line: bool = False  # a stream carries a line that is not JSON after its first words
    hold_after: int = 0  # > 0: admit this many chat calls (since the last reset), then hold later ones (0: off)
    # Batch API (/v1/files, /v1/batches): see tests/server_batches.py
    batches: bool = True  # False: /v1/batches answers 404, like a provider without a Batch API
    batch_validating_s: float = 0.05
    batch_progress_s: float = 0.2
    batch_finalizing_s: float = 0.05
    batch_outcome: str = "completed"  # or "failed" (validation fails) or "expired" (part left undone)
    batch_expire_fraction: float = 0.5  # share of requests left undone when a batch expires
    batch_error_rate: float = 0.0  # share of requests answered 500 in the error file
    batch_drop_ids: int = 0  # lines left out of each output file (missing custom_ids)
    batch_unknown_ids: int = 0  # lines with custom_ids nobody asked for, added to each output file
    batch_max_requests: int = 50_000  # larger input files are rejected at creation (400)


class _Bucket:
    """Continuous token bucket: ``per_minute`` refilled evenly, burst of one second's worth."""

    def __init__(self, per_minute: int) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate)
        self.tokens = self.capacity
        self.stamp = time.monotonic()

    def take(self, amount: float) -> float:
        """Take ``amount``; return 0 on success, else seconds until it would fit."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= amount:
            self.tokens -= amount
            return 0.0
        return (amount - self.tokens) / self.rate

    def remaining(self) -> int:
        return int(self.tokens)


def _prompt_tokens(messages: list[dict[str, Any]]) -> int:
    return sum(len(str(m.get("content", ""))) // 4 + 4 for m in messages)


class _State:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.stats: Counter[str] = Counter()
        self.seen: Counter[str] = Counter()
        self.requests: list[Any] = []
        self.rpm_bucket = _Bucket(config.rpm) if config.rpm else None
        self.tpm_bucket = _Bucket(config.tpm) if config.tpm else None
        self.files: dict[str, dict[str, Any]] = {}  # the Batch API's state (tests/server_batches.py)
        self.batches: dict[str, dict[str, Any]] = {}
        self.batch_ids_seen: Counter[str] = Counter()

    def reconfigure(self, changes: dict[str, Any]) -> None:
        names = {f.name for f in fields(ServerConfig)}
        unknown = set(changes) - names
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        for key, value in changes.items():
            setattr(self.config, key, value)
        self.rng = random.Random(self.config.seed)
        self.rpm_bucket = _Bucket(self.config.rpm) if self.config.rpm else None
        self.tpm_bucket = _Bucket(self.config.tpm) if self.config.tpm else None

    def complete(self, body: dict[str, Any], digest: str | None = None) -> tuple[int, dict[str, Any]]:
        """The answer to a chat-completion body, as (HTTP status, JSON): planted statuses, no choices, empty
        text, logprobs with the planted preference. Shared by the online path and the Batch API."""
        cfg = self.config
        messages = list(body["messages"])
        last = str(messages[-1].get("content", "")) if messages else ""
        markers = {name: value for name, value in _MARKER.findall(last)}
        if "status" in markers:
            status = int(markers["status"])
            self.stats[str(status)] += 1
            return status, {"error": {"message": f"planted status {status}"}}
        if "nochoices" in markers or cfg.nochoices:
            return 200, {"id": "x", "object": "chat.completion", "choices": []}
        max_tokens = int(body.get("max_tokens") or 16)
        text = "" if "empty" in markers else (_planted(cfg.replies, messages, body.get("seed")) or cfg.reply
                                                or _answer_text(messages, body.get("seed")))
        prompt_tokens = _prompt_tokens(messages)
        completion_tokens = min(max_tokens, len(text.split()))
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "stop" if completion_tokens < max_tokens else "length",
        }
        extra = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}
                 for i, t in enumerate(cfg.choices[1:], start=1)]
        if cfg.choices:
            choice["message"]["content"], choice["finish_reason"] = cfg.choices[0], "stop"
        if cfg.tool_calls:
            choice["message"] = {"role": "assistant", "content": None, "tool_calls": [
                {"id": f"call_{i}", "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                for i, c in enumerate(cfg.tool_calls)]}
            choice["finish_reason"] = "tool_calls"
        if body.get("logprobs") and "nologprobs" not in markers and cfg.logprobs:
            top = int(body.get("top_logprobs") or 1)
            prefer = next((choice for text, choice in cfg.prefer_when.items() if text in last), cfg.prefer)
            entries = _choice_logprobs(messages, prefer, top)
            choice["message"]["content"] = entries[0]["token"]
            choice["logprobs"] = {"content": [{**entries[0], "top_logprobs": entries}]}
        digest = digest or hashlib.sha256(orjson.dumps([messages, body.get("seed"), body.get("logprobs")])).hexdigest()
        return 200, {
            "id": f"chatcmpl-{digest[:12]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or cfg.model,
            "choices": [choice, *extra],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    def rate_headers(self) -> dict[str, str]:
        if not self.config.send_rate_headers:
            return {}
        headers: dict[str, str] = {}
        if self.rpm_bucket:
            headers["x-ratelimit-limit-requests"] = str(self.config.rpm)
            headers["x-ratelimit-remaining-requests"] = str(self.rpm_bucket.remaining())
            headers["x-ratelimit-reset-requests"] = f"{1.0 / self.rpm_bucket.rate:.3f}s"
        if self.tpm_bucket:
            headers["x-ratelimit-limit-tokens"] = str(self.config.tpm)
            headers["x-ratelimit-remaining-tokens"] = str(self.tpm_bucket.remaining())
            headers["x-ratelimit-reset-tokens"] = f"{1.0 / self.tpm_bucket.rate:.3f}s"
        return headers


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json", headers=headers)


_HTML = "<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>"


async def _admitted(request: web.Request, state: _State) -> bool:
    """Wait while ``hold_after`` holds chat calls, then admit this one; False when its client hung up meanwhile."""
    if state.config.hold_after and state.stats["admitted"] >= state.config.hold_after:
        state.stats["held"] += 1
        try:
            while state.config.hold_after and state.stats["admitted"] >= state.config.hold_after and not (  # noqa: ASYNC110
                    request.transport is None or request.transport.is_closing()):  # (a hang-up sets no event)
                await asyncio.sleep(0.02)
        finally:
            state.stats["held"] -= 1
        if request.transport is None or request.transport.is_closing():  # hung up, or killed before the release
            state.stats["held_dropped"] += 1
            return False
    state.stats["admitted"] += 1
    return True


async def _trickle(request: web.Request, body: bytes, seconds: float, state: _State) -> web.StreamResponse:
    """Send ``body`` a few bytes at a time over ``seconds`` (a server that answers, but too slowly)."""
    state.stats["trickled"] += 1
    response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
    response.content_length = len(body)
    await response.prepare(request)
    chunks = 20
    step = max(1, len(body) // chunks)
    for start in range(0, len(body), step):
        await response.write(body[start:start + step])
        await asyncio.sleep(seconds / chunks)
    await response.write_eof()
    return response


async def _truncated(request: web.Request, body: bytes, state: _State) -> web.StreamResponse:
    """Announce ``body``'s full length, send 40% of it, then close the connection (a body cut short)."""
    state.stats["truncated"] += 1
    response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
    response.content_length = len(body)
    await response.prepare(request)
    await response.write(body[: len(body) * 2 // 5])
    assert request.transport is not None
    request.transport.close()  # flushes what was written, then closes: the rest never comes
    raise ConnectionResetError("body cut short by the test server")


def _bad_utf8(body: bytes, state: _State) -> web.Response:
    """``body`` (JSON) with an invalid UTF-8 byte planted inside its first message text."""
    state.stats["bad_utf8"] += 1
    at = body.find(b'"content":"')
    at = at + len(b'"content":"') if at >= 0 else len(body) // 2
    return web.Response(body=body[:at] + b"\xff\xfe" + body[at:], status=200, content_type="application/json")


def _planted(rules: list[dict[str, Any]], messages: list[dict[str, Any]], seed: Any) -> str:
    """The reply of the first rule in ``rules`` that the request matches ("" when none does)."""
    last = str(messages[-1].get("content", "")) if messages else ""
    first = next((str(m.get("content", "")) for m in messages if m.get("role") == "user"), "")
    for rule in rules:
        if ("last" in rule and rule["last"] not in last) or ("first" in rule and rule["first"] not in first):
            continue
        if "seed" in rule and rule["seed"] != seed:
            continue
        if rule.get("base64") and not _holds_base64(last):
            continue
        if sum(m.get("role") == "user" for m in messages) < int(rule.get("min_user_turns", 0)):
            continue
        return str(rule["reply"])
    return ""


_BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{20,}={0,2}")


def _holds_base64(text: str) -> bool:
    """Whether ``text`` holds a base64 run (20+ characters, padded to a multiple of 4) that decodes to text."""
    for run in _BASE64_RUN.findall(text):
        if len(run) % 4:
            continue
        try:
            decoded = base64.b64decode(run, validate=True).decode("utf-8")
        except ValueError:
            continue
        if sum(c.isalpha() or c.isspace() for c in decoded) >= 0.8 * len(decoded):
            return True
    return False


def _answer_text(messages: list[dict[str, Any]], seed: Any) -> str:
    last = str(messages[-1].get("content", "")) if messages else ""
    digest = hashlib.sha256(orjson.dumps([messages, seed])).hexdigest()[:8]
    return f"Reply {digest} to: {last[:60]}"


def _choice_logprobs(messages: list[dict[str, Any]], prefer: str, top: int) -> list[dict[str, Any]]:
    if prefer in ("A", "B"):
        p_first = 0.9
        first, second = prefer, ("B" if prefer == "A" else "A")
    else:
        digest = hashlib.sha256(orjson.dumps(messages)).digest()
        p_first = 0.05 + 0.9 * digest[0] / 255.0
        first, second = "A", "B"
    entries = [
        {"token": first, "logprob": math.log(p_first * 0.95)},
        {"token": second, "logprob": math.log((1 - p_first) * 0.95)},
        {"token": " the", "logprob": math.log(0.05)},
    ]
    entries.sort(key=lambda e: -float(e["logprob"]))
    return entries[: max(1, top)]


async def _stream(request: web.Request, payload: dict[str, Any], chunk_ms: float, state: _State,
                  bad_line: bool = False) -> web.StreamResponse:
    try:
        return await _stream_events(request, payload, chunk_ms, bad_line)
    except ConnectionError:  # the client hung up mid-stream
        state.stats["stream_aborted"] += 1
        raise


async def _stream_events(request: web.Request, payload: dict[str, Any], chunk_ms: float,
                         bad_line: bool) -> web.StreamResponse:
    """The answer as server-sent ``chat.completion.chunk`` events, a word a chunk (each choice in turn; tool calls
    as deltas: the name, then the arguments a few characters at a time), then ``[DONE]``."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    base = {"id": payload["id"], "object": "chat.completion.chunk", "created": payload["created"],
            "model": payload["model"]}

    async def send(index: int, delta: dict[str, Any], finish: str | None = None) -> None:
        if chunk_ms:
            await asyncio.sleep(chunk_ms / 1000.0)
        event = {**base, "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}
        await response.write(b"data: " + orjson.dumps(event) + b"\n\n")

    for choice in payload["choices"]:
        index, message = choice["index"], choice["message"]
        await send(index, {"role": "assistant", "content": ""})
        words = str(message.get("content") or "").split(" ") if message.get("content") else []
        for position, word in enumerate(words):
            await send(index, {"content": word if position == len(words) - 1 else word + " "})
            if bad_line and position == 2:
                await response.write(b"data: {not json\n\n")
        for number, call in enumerate(message.get("tool_calls") or []):
            function = call["function"]
            await send(index, {"tool_calls": [{"index": number, "id": call["id"], "type": "function",
                                               "function": {"name": function["name"], "arguments": ""}}]})
            arguments = function["arguments"]
            for start in range(0, len(arguments), 7):
                await send(index, {"tool_calls": [{"index": number,
                                                   "function": {"arguments": arguments[start:start + 7]}}]})
        await send(index, {}, choice["finish_reason"])
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def build_app(config: ServerConfig) -> web.Application:
    """The aiohttp application; ``app["state"]`` holds config and statistics."""
    state = _State(config)
    app = web.Application()
    app["state"] = state

    async def chat(request: web.Request) -> web.StreamResponse:
        cfg = state.config
        state.stats["requests"] += 1
        if cfg.dead:
            state.stats["dead"] += 1
            assert request.transport is not None
            request.transport.abort()
            raise ConnectionResetError("dead test server")
        if cfg.retry_after_s:
            state.stats["429"] += 1
            return _json({"error": {"message": "Rate limit reached (long)", "type": "requests"}}, status=429,
                         headers={"Retry-After": f"{cfg.retry_after_s:g}"})
        if cfg.html:
            state.stats["html"] += 1
            return web.Response(text=_HTML, status=200, content_type="text/html")
        if cfg.echo_auth:  # a leaky upstream: its error quotes the header it received
            state.stats["401"] += 1
            given = request.headers.get("Authorization", "")
            return _json({"error": {"message": f"Incorrect API key provided: {given}", "type": "auth",
                                    "headers": {"authorization": given}}}, status=401)
        if cfg.api_key and request.headers.get("Authorization") != f"Bearer {cfg.api_key}":
            state.stats["401"] += 1
            return _json({"error": {"message": "Incorrect API key provided", "type": "auth"}}, status=401)
        try:
            body = orjson.loads(await request.read())
            messages = list(body["messages"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return _json({"error": {"message": "bad request body"}}, status=400)
        key = hashlib.sha256(orjson.dumps([messages, body.get("seed"), body.get("logprobs")])).hexdigest()
        if not await _admitted(request, state):
            raise ConnectionResetError("a held call's client hung up")
        if cfg.record:
            state.requests.append(messages)
        last = str(messages[-1].get("content", "")) if messages else ""
        markers = {name: value for name, value in _MARKER.findall(last)}
        max_tokens = int(body.get("max_tokens") or 16)
        for bucket, amount, kind in (
            (state.rpm_bucket, 1.0, "requests"),
            (state.tpm_bucket, float(_prompt_tokens(messages) + max_tokens), "tokens"),
        ):
            wait = bucket.take(amount) if bucket is not None else 0.0
            if wait > 0:
                state.stats["429"] += 1
                return _json(
                    {"error": {"message": f"Rate limit reached for {kind}", "type": kind}},
                    status=429,
                    headers={"Retry-After": f"{wait:.3f}", **state.rate_headers()},
                )
        if cfg.latency_ms:
            await asyncio.sleep(cfg.latency_ms / 1000.0)
        if "drop" in markers or (cfg.drop_rate and state.rng.random() < cfg.drop_rate):
            state.stats["dropped"] += 1
            assert request.transport is not None
            request.transport.abort()
            raise ConnectionResetError("dropped by test server")
        if cfg.fail_status:
            state.stats[str(cfg.fail_status)] += 1
            return _json({"error": {"message": f"The model {body.get('model')!r} does not exist"}},
                         status=cfg.fail_status)
        status, payload = state.complete(body, key)
        if status != 200:
            return _json(payload, status=status)
        if "malformed" in markers:
            return web.Response(body=b'{"choices": [', status=200, content_type="application/json")
        if "html" in markers:
            return web.Response(text=_HTML, status=200, content_type="text/html")
        if "error200" in markers:
            return _json({"error": {"message": "upstream overloaded", "type": "server_error"}})
        if "truncate" in markers or cfg.truncate:
            return await _truncated(request, orjson.dumps(payload), state)
        if "badutf8" in markers or cfg.bad_utf8:
            return _bad_utf8(orjson.dumps(payload), state)
        if cfg.error_rate and state.rng.random() < cfg.error_rate:
            state.stats["5xx"] += 1
            return _json({"error": {"message": "internal error (injected)"}}, status=503)
        if cfg.trickle_s:
            return await _trickle(request, orjson.dumps(payload), cfg.trickle_s, state)
        state.stats["ok"] += 1
        state.seen[key] += 1
        if cfg.answer_json is not None:
            return _json(cfg.answer_json)
        if body.get("stream"):
            return await _stream(request, payload, cfg.stream_chunk_ms, state, cfg.bad_stream_line)
        return _json(payload, headers=state.rate_headers())

    async def stats(_: web.Request) -> web.Response:
        repeats = sum(count - 1 for count in state.seen.values() if count > 1)
        return _json({**state.stats, "unique": len(state.seen), "repeats": repeats, "config": asdict(state.config)})

    async def reset(_: web.Request) -> web.Response:
        state.stats.clear()
        state.seen.clear()
        state.requests.clear()
        state.files.clear()
        state.batches.clear()
        state.batch_ids_seen.clear()
        return _json({"ok": True})

    async def requests(_: web.Request) -> web.Response:
        return _json(state.requests)

    async def configure(request: web.Request) -> web.Response:
        try:
            state.reconfigure(orjson.loads(await request.read()))
        except ValueError as exc:
            return _json({"error": {"message": str(exc)}}, status=400)
        return _json(asdict(state.config))

    async def models(_: web.Request) -> web.Response:
        return _json({"object": "list", "data": [{"id": state.config.model, "object": "model"}]})

    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/stats", stats)
    app.router.add_get("/requests", requests)
    app.router.add_post("/reset", reset)
    app.router.add_post("/config", configure)
    add_batch_routes(app, state)
    return app


async def _serve(config: ServerConfig, host: str, port: int) -> None:
    runner = web.AppRunner(build_app(config), access_log=None, handle_signals=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096)
    await site.start()
    server = site._server
    assert server is not None
    bound = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    gc.collect()
    gc.freeze()  # full collections scan only what serving creates: no 100 ms pauses in a benchmark's baseline
    print(f"PORT {bound}", flush=True)
    await asyncio.Event().wait()  # serve until the process is stopped


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: ``python -m tests.server``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    for f in fields(ServerConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.default is MISSING:  # mappings: set at run time through POST /config
            continue
        if f.type == "bool":
            parser.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=f.default)
        else:
            kind = {"float": float, "int": int}.get(str(f.type), str)
            parser.add_argument(flag, type=kind, default=f.default)
    args = parser.parse_args(argv)
    config = ServerConfig(**{f.name: getattr(args, f.name) for f in fields(ServerConfig) if f.default is not MISSING})
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)  # planted drops are not server errors
    if not args.host.startswith("127.") and args.host not in ("localhost", "::1"):
        sys.exit("the test server only binds loopback addresses")
    try:
        asyncio.run(_serve(config, args.host, args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
