"""``cai guard serve``: an OpenAI-compatible proxy that puts the guard in front of any upstream —
``/v1/chat/completions`` (plain and ``stream: true``), ``/v1/models`` passed through, and a check-only
``/v1/moderations``. Streamed answers are checked as they grow, with a hold-back buffer, so a violating stream
stops (``finish_reason: "content_filter"``) before the violating text reaches the client."""

from __future__ import annotations

import hmac
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import orjson
from aiohttp import web

from backends.errors import ConfigError
from backends.registry import Secret
from cai_async.engine import Engine, EngineConfig
from cai_async.guard.config import GuardConfig
from cai_async.guard.core import Guard, Verdict, VerdictLog
from cai_async.guard.upstream import UpstreamAnswer, UpstreamClient, UpstreamUnreachable
from cai_async.serving import freeze_startup_heap, stop_on_signal

__all__ = ["build_proxy_app", "serve_guard"]

_GUARD = web.AppKey("guard", Guard)


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> web.Response:
    """An OpenAI-shaped error answer."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _completion(body: dict[str, Any], content: str, finish: str, verdict: Verdict | None) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-guard-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()),
        "model": str(body.get("model") or ""),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        **({"cai_guard": verdict.as_dict()} if verdict is not None else {}),
    }


def _chunk(template: dict[str, Any], delta: dict[str, Any], finish: str | None = None,
           verdict: Verdict | None = None) -> bytes:
    event = {**template, "object": "chat.completion.chunk",
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if verdict is not None:
        event["cai_guard"] = verdict.as_dict()
    return b"data: " + orjson.dumps(event) + b"\n\n"


async def _body(request: web.Request) -> tuple[bytes, Any] | web.Response:
    """The request's bytes (what goes on to the upstream, unchanged) and its JSON, or the 400 that says it is not
    JSON."""
    raw = await request.read()
    try:
        return raw, orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _error(400, "the request body is not valid JSON")


def _messages(body: Any) -> list[dict[str, Any]] | web.Response:
    """The request's messages as the guard reads them (text content; the text parts of a list of content parts),
    or the 400 that says what is wrong with them. The request itself is not changed."""
    if not isinstance(body, dict):
        return _error(400, "the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return _error(400, "'messages' must be a non-empty list of {role, content}", param="messages")
    read: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return _error(400, f"messages[{index}] must be an object with a 'role'", param=f"messages[{index}]")
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        elif content is not None and not isinstance(content, str):
            return _error(400, f"messages[{index}].content must be text", param=f"messages[{index}].content")
        read.append({**message, "content": content})
    return read


class _Upstream:
    """Where requests go on: base URL and how they are authorised (the configured key, or the client's)."""

    def __init__(self, config: GuardConfig) -> None:
        if not config.upstream.base_url:
            raise ConfigError("guard.upstream.base_url: the proxy needs an upstream (…/v1 of an OpenAI-compatible "
                              "server); pass --upstream URL")
        self.base_url = config.upstream.base_url.rstrip("/")
        self.client = UpstreamClient(self.base_url, timeout_s=config.upstream.timeout_s)
        self.key: Secret | None = None
        if config.upstream.api_key_env:
            value = os.environ.get(config.upstream.api_key_env)
            if not value:
                raise ConfigError(f"guard.upstream.api_key_env: the variable {config.upstream.api_key_env} is not set")
            self.key = Secret(value)
        self.own_key: Secret | None = None
        if config.api_key_env:
            value = os.environ.get(config.api_key_env)
            if not value:
                raise ConfigError(f"guard.api_key_env: the variable {config.api_key_env} is not set")
            self.own_key = Secret(value)
        if self.own_key is not None and self.key is None:
            raise ConfigError("guard: with a key of the proxy's own (api_key_env) the client's key cannot be passed "
                              "on; set guard.upstream.api_key_env too")

    def headers(self, request: web.Request) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.key is not None:
            headers["Authorization"] = f"Bearer {self.key.get()}"
        elif "Authorization" in request.headers:
            headers["Authorization"] = request.headers["Authorization"]
        return headers

    def allowed(self, request: web.Request) -> bool:
        if self.own_key is None:
            return True
        given = request.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {self.own_key.get()}".encode())


def build_proxy_app(guard: Guard, config: GuardConfig) -> web.Application:
    """The proxy's aiohttp application (its pooled connections to the upstream open and close with the app)."""
    upstream = _Upstream(config)
    app = web.Application(client_max_size=64 * 1024 * 1024)
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

    @authorised
    async def chat(request: web.Request) -> web.StreamResponse:
        given = await _body(request)
        if isinstance(given, web.Response):
            return given
        raw, body = given
        messages = _messages(body)
        if isinstance(messages, web.Response):
            return messages
        stream = bool(body.get("stream"))
        verdict = await guard.check_input(messages)
        if verdict.blocked:
            if stream:
                return await _stream_text(request, body, verdict.refusal(), "content_filter", verdict)
            return _json(_completion(body, verdict.refusal(), "content_filter", verdict))
        flagged_input = verdict if verdict.decision == "flag" else None
        try:
            answer = await upstream.client.send("POST", "/chat/completions", body=raw,
                                                     headers=upstream.headers(request))
        except UpstreamUnreachable as exc:
            return _unreachable(upstream.base_url, exc)
        async with answer:
            if answer.status != 200 or (not config.output.enabled and flagged_input is None):
                return await _relay_bytes(request, answer)  # an error, or nothing to check: relay the bytes
            if stream and answer.content_type == "text/event-stream":
                return await _relay_stream(request, guard, config, messages, answer, flagged_input)
            try:
                payload = orjson.loads(await answer.read())
            except UpstreamUnreachable as exc:
                return _unreachable(upstream.base_url, exc)
            except orjson.JSONDecodeError:
                return _error(502, f"the upstream {upstream.base_url} answered with something that is not JSON",
                              "upstream_error")
        choice = (payload.get("choices") or [{}])[0]
        text = str((choice.get("message") or {}).get("content") or "")
        out = await guard.check_output(messages, text)
        if out.blocked:
            choice["message"] = {"role": "assistant", "content": out.refusal()}
            choice["finish_reason"] = "content_filter"
        elif out.revised is not None:
            choice["message"] = {"role": "assistant", "content": out.revised}
        if out.decision != "allow" or flagged_input is not None:
            payload["cai_guard"] = (out if out.decision != "allow" else flagged_input).as_dict()  # type: ignore[union-attr]
        return _json(payload)

    @authorised
    async def models(request: web.Request) -> web.StreamResponse:
        try:
            async with await upstream.client.send("GET", "/models", headers=upstream.headers(request)) as answer:
                return await _relay_bytes(request, answer)
        except UpstreamUnreachable as exc:
            return _unreachable(upstream.base_url, exc)

    @authorised
    async def moderations(request: web.Request) -> web.StreamResponse:
        read = await _body(request)
        if isinstance(read, web.Response):
            return read
        body = read[1]
        given = body.get("input") if isinstance(body, dict) else None
        inputs = [given] if isinstance(given, str) else given
        if not isinstance(inputs, list) or not inputs or not all(isinstance(t, str) for t in inputs):
            return _error(400, "'input' must be a string or a list of strings", param="input")
        results = []
        for text in inputs:
            verdict = await guard.check_input([{"role": "user", "content": text}])
            violated = {p.name for p in verdict.violated}
            results.append({
                "flagged": bool(violated) or verdict.blocked,
                "categories": {p.name: p.name in violated for p in guard.principles},
                "category_scores": {p.name: round(p.score, 6) for p in verdict.scores},
                "cai_guard": verdict.as_dict(),
            })
        return _json({"id": f"modr-{uuid.uuid4().hex[:12]}", "model": "cai-guard", "results": results})

    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/moderations", moderations)
    return app


def _unreachable(base_url: str, exc: UpstreamUnreachable) -> web.Response:
    return _error(502, f"the upstream {base_url} could not be reached ({exc}); check guard.upstream.base_url and that "
                       "the server runs", "upstream_error")


async def _relay_bytes(request: web.Request, answer: UpstreamAnswer) -> web.StreamResponse:
    """The upstream's answer as it comes: a stream chunk by chunk, anything else whole (one write)."""
    content_type = answer.headers.get("content-type", "application/json")
    if answer.content_type != "text/event-stream":
        return web.Response(body=await answer.read(), status=answer.status, headers={"Content-Type": content_type})
    response = web.StreamResponse(status=answer.status, headers={"Content-Type": content_type})
    await response.prepare(request)
    async for data in answer.chunks():
        await response.write(data)
    await response.write_eof()
    return response


async def _stream_text(request: web.Request, body: dict[str, Any], text: str, finish: str,
                       verdict: Verdict | None) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    template = {"id": f"chatcmpl-guard-{uuid.uuid4().hex[:12]}", "created": int(time.time()),
                "model": str(body.get("model") or "")}
    await response.write(_chunk(template, {"role": "assistant", "content": text}))
    await response.write(_chunk(template, {}, finish, verdict))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def _relay_stream(request: web.Request, guard: Guard, config: GuardConfig, messages: list[dict[str, Any]],
                        answer: UpstreamAnswer, flagged: Verdict | None) -> web.StreamResponse:
    """Relay an upstream stream, checking the answer every few chunks; text within ``hold_back_chars`` of
    the last check (or all of it, for ``revise``) is held until a later check clears it."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    policy = config.stream
    hold_all = config.output.action == "revise"
    text, released, since, finish = "", 0, 0, "stop"
    template: dict[str, Any] = {}

    async def release(upto: int) -> None:
        nonlocal released
        if upto > released:
            await response.write(_chunk(template, {"content": text[released:upto]}))
            released = upto

    async def cut(verdict: Verdict) -> web.StreamResponse:
        await response.write(_chunk(template, {}, "content_filter", verdict))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async for line in answer.lines():
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        event = orjson.loads(data)
        if not template:
            template = {k: event.get(k) for k in ("id", "created", "model")}
            await response.write(_chunk(template, {"role": "assistant", "content": ""}))
        choice = (event.get("choices") or [{}])[0]
        content = (choice.get("delta") or {}).get("content") or ""
        text += content
        since += bool(content)
        finish = choice.get("finish_reason") or finish
        if since >= policy.check_every_chunks and not hold_all:
            since = 0
            verdict = await guard.check_output(messages, text, final=False)
            if verdict.blocked:
                await guard.check_output(messages, text)  # logged as the final verdict of this answer
                answer.release()  # the rest of the stream is not read: the connection closes
                return await cut(verdict)
            await release(max(released, len(text) - policy.hold_back_chars))
        if choice.get("finish_reason"):
            break
    verdict = await guard.check_output(messages, text)
    if verdict.blocked:
        return await cut(verdict)
    if verdict.revised is not None:
        text = verdict.revised
    await release(len(text))
    marked = verdict if verdict.decision != "allow" else flagged
    await response.write(_chunk(template, {}, finish, marked))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def serve_guard(config: GuardConfig, engine_config: EngineConfig, run_dir: str | Path, *,
                      on_ready: Callable[[int], None] | None = None) -> None:
    """Serve the proxy on ``config.host:config.port`` until cancelled; verdicts go to ``RUN_DIR/guard``."""
    _Upstream(config)  # a missing upstream or key variable is the first thing to say
    async with Engine(engine_config, run_dir=run_dir) as engine:
        log = VerdictLog(run_dir)
        app = build_proxy_app(Guard(engine, config, log=log), config)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, config.host, config.port, backlog=4096)
        try:
            await site.start()
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
