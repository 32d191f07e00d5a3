"""``cai guard serve``: an OpenAI-compatible proxy that puts the guard in front of any upstream —
``/v1/chat/completions`` (plain and ``stream: true``, every choice and tool call checked), ``/v1/models`` passed
through, and a check-only ``/v1/moderations``. The upstream gets exactly the request the guard read (re-encoded
from the parsed body, so no parser of the upstream's can read something else into it). Streamed answers are
checked as they grow, with a hold-back buffer, so a violating stream stops (``finish_reason: "content_filter"``)
before the violating text reaches the client. Every answer is redacted of the configured secrets; a check that
could not be made as configured (fail-open, oversize) is marked on the answer (``cai_guard``, ``X-Cai-Guard``)
and said on the console."""

from __future__ import annotations

import errno
import hmac
import logging
import os
import re
import sys
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import orjson
from aiohttp import web
from pydantic import SecretStr

from backends.errors import ConfigError
from cai_async.engine import Engine, EngineConfig
from cai_async.guard.config import GuardConfig
from cai_async.guard.core import Guard, Verdict, VerdictLog
from cai_async.guard.exchange import ExchangeError, ReadRequest
from cai_async.guard.stream import relay_stream, stream_text
from cai_async.guard.upstream import UpstreamAnswer, UpstreamClient, UpstreamUnreachable
from cai_async.serving import freeze_startup_heap, stop_on_signal

__all__ = ["build_proxy_app", "serve_guard"]

_GUARD = web.AppKey("guard", Guard)
_BEARER = re.compile(rb"(?i)\b(bearer|basic|token)(\s+|%20)[^\s\"',;}\\]{4,}")
_KEY_FIELD = re.compile(rb"(?i)(\"?(?:api[_-]?key|authorization|x-api-key)\"?\s*[:=]\s*\"?)[^\s\"',;}\\]{4,}")


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
           headers: dict[str, str] | None = None) -> web.Response:
    """An OpenAI-shaped error answer."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", headers=headers)


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json", headers=headers)


def _mark_header(verdict: Verdict | None) -> dict[str, str]:
    """``X-Cai-Guard: <decision>; tier=<tier>`` for a marked verdict."""
    if verdict is None or not verdict.marked:
        return {}
    return {"X-Cai-Guard": f"{verdict.decision}; tier={verdict.tier}"}


def _completion(body: dict[str, Any], content: str, finish: str, verdict: Verdict | None) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-guard-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()),
        "model": str(body.get("model") or ""),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        **({"cai_guard": verdict.as_dict()} if verdict is not None else {}),
    }


_MAX_BODY = 64 * 1024 * 1024
"""The largest request body the proxy reads, compressed or once decompressed (a small zip bomb stays small)."""


def _inflate(data: bytes, wbits: int) -> bytes:
    """Decompress ``data`` (gzip: wbits 31, zlib: 15, raw deflate: -15), refusing to grow past ``_MAX_BODY``."""
    inflater = zlib.decompressobj(wbits)
    out = inflater.decompress(data, _MAX_BODY + 1)
    if len(out) > _MAX_BODY or inflater.unconsumed_tail:
        raise ValueError(f"it decompresses to more than {_MAX_BODY // (1024 * 1024)} MiB")
    if not inflater.eof:
        raise ValueError("it is cut short")
    return out


def _deflate(data: bytes) -> bytes:
    try:
        return _inflate(data, 15)
    except zlib.error:
        return _inflate(data, -15)


_ENCODINGS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": lambda data: _inflate(data, 31), "x-gzip": lambda data: _inflate(data, 31), "deflate": _deflate,
    "identity": lambda data: data}


async def _body(request: web.Request) -> tuple[bytes, Any] | web.Response:
    """The request's bytes and its JSON, or the 4xx that says what is wrong with them: a body compressed in an
    encoding the proxy does not read is 415, one that does not decompress (or grows past 64 MiB) or is not JSON
    is 400. The server does not decompress on its own, so every case gets an OpenAI-shaped answer."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in _ENCODINGS:
        return _error(415, f"Content-Encoding {encoding!r} is not supported; send the body plain, gzip or deflate")
    raw = await request.read()
    try:
        raw = _ENCODINGS[encoding](raw)
    except (ValueError, zlib.error) as exc:
        return _error(400, f"the body is declared Content-Encoding {encoding!r} but does not decompress ({exc})")
    try:
        return raw, orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _error(400, "the request body is not valid JSON (UTF-8, no lone surrogates)")


class _Redactor:
    """Takes every configured secret out of what the proxy sends back: the upstream's key, the proxy's own, the
    engine's endpoint keys — and, in error bodies, anything that looks like an ``Authorization`` echo."""

    def __init__(self, secrets: list[str]) -> None:
        self.secrets = sorted({s.encode() for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def __call__(self, data: bytes) -> bytes:
        for secret in self.secrets:
            if secret in data:
                data = data.replace(secret, b"***")
        return data

    def text(self, text: str) -> str:
        return self(text.encode("utf-8", "surrogatepass")).decode("utf-8", "replace")

    def error_body(self, data: bytes) -> bytes:
        data = self(data)
        data = _BEARER.sub(rb"\1\2***", data)
        return _KEY_FIELD.sub(rb"\1***", data)


class _Console:
    """Says on stderr when checks were not made as configured (fail-open, fail-closed, oversize): per kind, the
    first at once, then at most one line every ``every_s`` seconds with the count since."""

    def __init__(self, redact: _Redactor, every_s: float = 10.0) -> None:
        self.redact, self.every_s = redact, every_s
        self.last: dict[str, float] = {}
        self.pending: dict[str, int] = {}

    def __call__(self, verdict: Verdict) -> None:
        if verdict.tier not in ("fail-open", "fail-closed", "oversize") or verdict.notice is None:
            return
        kind = f"{verdict.direction} {verdict.decision} [{verdict.tier}]"
        self.pending[kind] = self.pending.get(kind, 0) + 1
        now = time.monotonic()
        if now - self.last.get(kind, -self.every_s) >= self.every_s:
            count = f" ({self.pending[kind]} since the last line)" if self.pending[kind] > 1 else ""
            sys.stderr.write(f"cai guard: {kind}{count}: {self.redact.text(verdict.notice)}\n")
            sys.stderr.flush()
            self.last[kind], self.pending[kind] = now, 0


class _Upstream:
    """Where requests go on: base URL and how they are authorised (the configured key, or the client's)."""

    def __init__(self, config: GuardConfig) -> None:
        if not config.upstream.base_url:
            raise ConfigError("guard.upstream.base_url: the proxy needs an upstream (…/v1 of an OpenAI-compatible "
                              "server); pass --upstream URL")
        self.base_url = config.upstream.base_url.rstrip("/")
        self.client = UpstreamClient(self.base_url, timeout_s=config.upstream.timeout_s)
        self.key: SecretStr | None = None
        if config.upstream.api_key_env:
            value = os.environ.get(config.upstream.api_key_env)
            if not value:
                raise ConfigError(f"guard.upstream.api_key_env: the variable {config.upstream.api_key_env} is not set")
            self.key = SecretStr(value)
        self.own_key: SecretStr | None = None
        if config.api_key_env:
            value = os.environ.get(config.api_key_env)
            if not value:
                raise ConfigError(f"guard.api_key_env: the variable {config.api_key_env} is not set")
            self.own_key = SecretStr(value)
        if self.own_key is not None and self.key is None:
            raise ConfigError("guard: with a key of the proxy's own (api_key_env) the client's key cannot be passed "
                              "on; set guard.upstream.api_key_env too")

    def headers(self, request: web.Request) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.key is not None:
            headers["Authorization"] = f"Bearer {self.key.get_secret_value()}"
        elif "Authorization" in request.headers:
            headers["Authorization"] = request.headers["Authorization"]
        return headers

    def allowed(self, request: web.Request) -> bool:
        if self.own_key is None:
            return True
        given = request.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {self.own_key.get_secret_value()}".encode())


@web.middleware
async def _no_traceback(request: web.Request,
                        handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """A failure of the proxy's own is an OpenAI-shaped 500 that names it (the traceback goes to run.log only);
    nothing unchecked is forwarded because of it."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception as exc:
        logging.getLogger("cai_async.guard").exception("the guard failed on %s", request.path)
        return _error(500, f"the guard failed on this request ({type(exc).__name__}); nothing was forwarded past "
                           "the failure; the traceback is in RUN_DIR/run.log", "server_error")


def _engine_secrets(engine: Engine) -> list[str]:
    """The keys of the engine's endpoints (the judge's), read from the variables their configs name."""
    names = [e.api_key_env for group in engine.config.groups.values() for e in group if e.api_key_env]
    return [os.environ[name] for name in names if os.environ.get(name)]


def build_proxy_app(guard: Guard, config: GuardConfig) -> web.Application:
    """The proxy's aiohttp application (its pooled connections to the upstream open and close with the app)."""
    upstream = _Upstream(config)
    redact = _Redactor([s.get_secret_value() for s in (upstream.key, upstream.own_key) if s is not None]
                       + _engine_secrets(guard.engine))
    console = _Console(redact)
    app = web.Application(client_max_size=_MAX_BODY, middlewares=[_no_traceback])
    app[_GUARD] = guard

    async def close_client(app: web.Application) -> None:
        upstream.client.close()

    app.on_cleanup.append(close_client)

    def authorised(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Any:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            if not upstream.allowed(request):
                return _error(401, "missing or wrong API key for this proxy", "authentication_error")
            return await handler(request)
        return wrapped

    def marked(verdict: Verdict) -> dict[str, Any]:
        out = verdict.as_dict()
        if "notice" in out:
            out["notice"] = redact.text(out["notice"])
        return out

    async def on_verdict(verdict: Verdict) -> None:
        console(verdict)

    @authorised
    async def chat(request: web.Request) -> web.StreamResponse:
        given = await _body(request)
        if isinstance(given, web.Response):
            return given
        body = given[1]
        if not isinstance(body, dict):
            return _error(400, "the request body must be a JSON object")
        try:
            parts = guard.read_request(body.get("messages") or [], body)
        except ExchangeError as exc:
            return _error(400, str(exc), param=exc.param)
        stream = bool(body.get("stream"))
        verdict = await guard.check_input(parts)
        console(verdict)
        if verdict.blocked:
            if verdict.tier == "oversize":
                return _error(400, redact.text(verdict.notice or "the request is too long for the guard"),
                              param="messages", headers=_mark_header(verdict))
            if stream:
                return await stream_text(request, body, verdict.refusal(), "content_filter", verdict,
                                         _mark_header(verdict))
            return _json(_completion(body, verdict.refusal(), "content_filter", verdict), headers=_mark_header(verdict))
        flagged_input = verdict if verdict.marked else None
        try:  # the upstream reads exactly what the guard read: the parsed body, encoded again
            answer = await upstream.client.send("POST", "/chat/completions", body=orjson.dumps(body),
                                                headers=upstream.headers(request))
        except UpstreamUnreachable as exc:
            return _unreachable(upstream.base_url, exc)
        async with answer:
            if answer.status != 200:
                return await _relay_bytes(request, answer, redact.error_body)
            if not config.output.enabled and flagged_input is None:
                return await _relay_bytes(request, answer, redact)  # nothing to check: relay the bytes
            if stream and answer.content_type == "text/event-stream":
                n = body.get("n")
                expected = n if isinstance(n, int) and n > 0 else 1
                return await relay_stream(request, guard, config, parts, answer, flagged_input, redact, on_verdict,
                                          expected=expected)
            try:
                payload = orjson.loads(_decoded(answer, await answer.read()))
            except UpstreamUnreachable as exc:
                return _unreachable(upstream.base_url, exc)
            except (orjson.JSONDecodeError, ValueError, zlib.error):
                return _error(502, f"the upstream {upstream.base_url} answered with something that is not JSON",
                              "upstream_error")
        if not isinstance(payload, dict) or not isinstance(payload.get("choices"), list):
            return _error(502, f"the upstream {upstream.base_url} answered JSON that is not a chat completion "
                               "(an object with a list of choices)", "upstream_error")
        mark = await _check_choices(guard, parts, payload["choices"], console)
        mark = mark if mark is not None else flagged_input
        if mark is not None:
            payload["cai_guard"] = marked(mark)
        return web.Response(body=redact(orjson.dumps(payload)), content_type="application/json",
                            headers=_mark_header(mark))

    @authorised
    async def models(request: web.Request) -> web.StreamResponse:
        try:
            async with await upstream.client.send("GET", "/models", headers=upstream.headers(request)) as answer:
                return await _relay_bytes(request, answer, redact if answer.status == 200 else redact.error_body)
        except UpstreamUnreachable as exc:
            return _unreachable(upstream.base_url, exc)

    @authorised
    async def moderations(request: web.Request) -> web.StreamResponse:
        read = await _body(request)
        if isinstance(read, web.Response):
            return read
        body = read[1]
        given = body.get("input") if isinstance(body, dict) else None
        if isinstance(given, str):
            inputs: list[Any] = [given]
        elif isinstance(given, list) and given and all(isinstance(t, str) for t in given):
            inputs = list(given)
        elif isinstance(given, list) and given and all(isinstance(t, dict) for t in given):
            inputs = [given]  # one input of content parts (text and images)
        else:
            return _error(400, "'input' must be a string, a list of strings or a list of content parts",
                          param="input")
        results = []
        for content in inputs:
            try:
                verdict = await guard.check_input([{"role": "user", "content": content}])
            except ExchangeError as exc:
                return _error(400, str(exc).replace("messages[0].content", "input"), param="input")
            console(verdict)
            violated = {p.name for p in verdict.violated}
            results.append({
                "flagged": bool(violated) or verdict.blocked,
                "categories": {p.name: p.name in violated for p in guard.principles},
                "category_scores": {p.name: round(p.score, 6) for p in verdict.scores},
                "cai_guard": marked(verdict),
            })
        return _json({"id": f"modr-{uuid.uuid4().hex[:12]}", "model": "cai-guard", "results": results})

    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/moderations", moderations)
    return app


async def _check_choices(guard: Guard, parts: ReadRequest, choices: list[Any],
                         console: Callable[[Verdict], None]) -> Verdict | None:
    """Check every choice of a completion (its text and tool calls) at once; a blocked one is replaced by the
    refusal, a revised one by the revision. Returns the verdict to mark the answer with (a block first)."""
    verdicts: list[Verdict | None] = [None] * len(choices)

    async def one(position: int, choice: Any) -> None:
        if not isinstance(choice, dict):
            choice = {"message": {"content": str(choice)}}
        message = choice.get("message")
        if not isinstance(message, dict):  # a completions-style choice, or something else: all its text is read
            message = {"content": choice.get("text") if isinstance(choice.get("text"), str) else None,
                       "fields": {k: v for k, v in choice.items() if k not in ("index", "finish_reason", "text")}}
        index = choice.get("index", position)
        verdicts[position] = await guard.check_output(parts, message,
                                                      choice=index if isinstance(index, int) else position)

    async with anyio.create_task_group() as tg:
        for position, choice in enumerate(choices):
            tg.start_soon(one, position, choice)
    for choice, verdict in zip(choices, verdicts, strict=True):
        assert verdict is not None
        console(verdict)
        if not isinstance(choice, dict):
            continue
        if verdict.blocked or verdict.revised is not None:  # nothing of the old answer stays (logprobs, text)
            for key in [k for k in choice if k not in ("index", "finish_reason")]:
                del choice[key]
            choice["message"] = {"role": "assistant",
                                 "content": verdict.refusal() if verdict.blocked else verdict.revised}
            if verdict.blocked:
                choice["finish_reason"] = "content_filter"
    ranked = sorted((v for v in verdicts if v is not None and v.marked), key=lambda v: not v.blocked)
    return ranked[0] if ranked else None


def _decoded(answer: UpstreamAnswer, data: bytes) -> bytes:
    """An answer's body, decompressed when the upstream compressed it although it was not asked to."""
    encoding = answer.headers.get("content-encoding", "identity").strip().lower()
    return _ENCODINGS[encoding](data) if encoding in _ENCODINGS else data


def _unreachable(base_url: str, exc: UpstreamUnreachable) -> web.Response:
    return _error(502, f"the upstream {base_url} could not be reached ({exc}); check guard.upstream.base_url and that "
                       "the server runs", "upstream_error")


async def _relay_bytes(request: web.Request, answer: UpstreamAnswer,
                       redact: Callable[[bytes], bytes]) -> web.StreamResponse:
    """The upstream's answer as it comes, redacted: a stream line by line, anything else whole (one write)."""
    headers = {"Content-Type": answer.headers.get("content-type", "application/json")}
    if answer.content_type != "text/event-stream":
        try:
            data = _decoded(answer, await answer.read())
        except (ValueError, zlib.error):
            return _error(502, "the upstream's answer does not decompress", "upstream_error")
        return web.Response(body=redact(data), status=answer.status, headers=headers)
    response = web.StreamResponse(status=answer.status, headers=headers)
    await response.prepare(request)
    try:
        async for line in answer.lines():
            await response.write(redact(line))
    except UpstreamUnreachable as exc:
        from cai_async.guard.stream import error_event

        await response.write(error_event(f"the upstream's stream broke off ({exc})"))
    await response.write_eof()
    return response


async def serve_guard(config: GuardConfig, engine_config: EngineConfig, run_dir: str | Path, *,
                      on_ready: Callable[[int], None] | None = None) -> None:
    """Serve the proxy on ``config.host:config.port`` until cancelled; verdicts go to ``RUN_DIR/guard``. A port
    in use is a :class:`ConfigError` that says so."""
    _Upstream(config)  # a missing upstream or key variable is the first thing to say
    async with Engine(engine_config, run_dir=run_dir) as engine:
        log = VerdictLog(run_dir)
        app = build_proxy_app(Guard(engine, config, log=log), config)
        # a client that hangs up cancels its handler, and with it the upstream request and the checks
        runner = web.AppRunner(app, access_log=None, handle_signals=False, handler_cancellation=True,
                               auto_decompress=False)
        await runner.setup()
        site = web.TCPSite(runner, config.host, config.port, backlog=4096)
        try:
            try:
                await site.start()
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
                    raise ConfigError(f"guard: cannot listen on {config.host}:{config.port} ({exc.strerror}); stop "
                                      "what holds that port or pick another with --port (0: any free port)") from None
                raise
            freeze_startup_heap()
            port = int(runner.addresses[0][1])
            if on_ready is not None:
                on_ready(port)
            async with anyio.create_task_group() as tg:
                tg.start_soon(stop_on_signal, tg.cancel_scope)
                tg.start_soon(_flush_every, log, 2.0)
        finally:
            with anyio.CancelScope(shield=True):
                await runner.cleanup()
                log.flush()


async def _flush_every(log: VerdictLog, seconds: float) -> None:
    while True:
        await anyio.sleep(seconds)
        log.flush()
