"""The guard proxy's relay of a streamed answer: every choice (``n > 1``) is followed on its own — text checked
every few chunks and released behind a hold-back, tool-call deltas gathered and held until the choice's final
check, then released in one delta or cut (``finish_reason: "content_filter"``). The upstream is read line by
line and every line's secrets are redacted; a line that is not JSON, an error event or a stream that breaks off
ends the relay with an OpenAI-shaped error event, never with unchecked text."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from cai_async.guard.config import GuardConfig
from cai_async.guard.core import Guard
from cai_async.guard.exchange import ReadRequest
from cai_async.guard.upstream import UpstreamAnswer, UpstreamUnreachable
from cai_async.guard.verdicts import Verdict

__all__ = ["error_event", "relay_stream", "stream_text"]

Redact = Callable[[bytes], bytes]
Mark = Callable[[Verdict], Awaitable[None]]


def chunk(template: dict[str, Any], index: int, delta: dict[str, Any], finish: str | None = None,
          verdict: Verdict | None = None) -> bytes:
    """One ``chat.completion.chunk`` event for choice ``index``."""
    event = {**template, "object": "chat.completion.chunk",
             "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}
    if verdict is not None:
        event["cai_guard"] = verdict.as_dict()
    return b"data: " + orjson.dumps(event) + b"\n\n"


def error_event(message: str, kind: str = "upstream_error") -> bytes:
    """An OpenAI-shaped error event (the official SDKs raise it as an ``APIError``)."""
    error = {"message": message, "type": kind, "param": None, "code": None}
    return b"data: " + orjson.dumps({"error": error}) + b"\n\n"


async def _open(request: web.Request, headers: dict[str, str] | None = None) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           **(headers or {})})
    await response.prepare(request)
    return response


async def _close(response: web.StreamResponse) -> web.StreamResponse:
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def stream_text(request: web.Request, body: dict[str, Any], text: str, finish: str, verdict: Verdict | None,
                      headers: dict[str, str] | None = None) -> web.StreamResponse:
    """A whole answer of the guard's own (a refusal) as a stream."""
    response = await _open(request, headers)
    template = {"id": f"chatcmpl-guard-{uuid.uuid4().hex[:12]}", "created": int(time.time()),
                "model": str(body.get("model") or "")}
    await response.write(chunk(template, 0, {"role": "assistant", "content": text}))
    await response.write(chunk(template, 0, {}, finish, verdict))
    return await _close(response)


@dataclass(slots=True)
class _Choice:
    """One choice of a streamed answer as it grows."""

    index: int
    text: str = ""
    released: int = 0
    since: int = 0
    finish: str | None = None
    calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    done: bool = False

    def message(self) -> dict[str, Any]:
        """The choice so far as an assistant message (what the guard checks)."""
        return {"content": self.text, "tool_calls": [self.calls[i] for i in sorted(self.calls)] or None}

    def add_calls(self, deltas: Any) -> None:
        for delta in deltas if isinstance(deltas, list) else []:
            if not isinstance(delta, dict):
                continue
            position = delta.get("index", len(self.calls))
            call = self.calls.setdefault(int(position) if isinstance(position, int) else len(self.calls),
                                         {"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
            call["id"] = delta.get("id") or call["id"]
            call["type"] = delta.get("type") or call["type"]
            given = delta.get("function")
            function: dict[str, Any] = given if isinstance(given, dict) else {}
            call["function"]["name"] += str(function.get("name") or "")
            call["function"]["arguments"] += str(function.get("arguments") or "")


async def relay_stream(request: web.Request, guard: Guard, config: GuardConfig, parts: ReadRequest,
                       answer: UpstreamAnswer, flagged: Verdict | None, redact: Redact,
                       on_verdict: Mark, *, expected: int = 1) -> web.StreamResponse:
    """Relay an upstream stream, checking each choice every ``stream.check_every_chunks`` chunks and when it
    finishes; text within ``hold_back_chars`` of the last check (all of it, for ``revise``) and every tool call
    are held until a later check clears them. ``expected``: the choices asked for (``n``)."""
    response = await _open(request)
    policy = config.stream
    hold_all = config.output.action == "revise"
    choices: dict[int, _Choice] = {}
    template: dict[str, Any] = {}
    usage: bytes | None = None

    async def release(choice: _Choice, upto: int) -> None:
        if upto > choice.released:
            await response.write(chunk(template, choice.index, {"content": choice.text[choice.released:upto]}))
            choice.released = upto

    async def finish(choice: _Choice) -> None:
        """The final check of a choice: cut it, or release what is held and its tool calls."""
        choice.done = True
        verdict = await guard.check_output(parts, choice.message(), choice=choice.index)
        await on_verdict(verdict)
        if verdict.blocked:
            await response.write(chunk(template, choice.index, {}, "content_filter", verdict))
            return
        if verdict.revised is not None:
            choice.text, choice.calls = verdict.revised, {}
        await release(choice, len(choice.text))
        if choice.calls:
            calls = [{"index": i, **choice.calls[i]} for i in sorted(choice.calls)]
            await response.write(chunk(template, choice.index, {"tool_calls": calls}))
        marked = verdict if verdict.marked else flagged
        await response.write(chunk(template, choice.index, {}, choice.finish or "stop", marked))

    async def checked(choice: _Choice) -> None:
        """A check of a choice as it grows: cut it, or release what is checked but the hold-back."""
        choice.since = 0
        verdict = await guard.check_output(parts, choice.message(), final=False, choice=choice.index)
        if verdict.blocked:
            choice.done = True
            final = await guard.check_output(parts, choice.message(), choice=choice.index)  # logged as final
            await on_verdict(final)
            await response.write(chunk(template, choice.index, {}, "content_filter", verdict))
            return
        held = min(policy.hold_back_chars, len(choice.text) // 2)  # the first check releases at least half
        await release(choice, max(choice.released, len(choice.text) - held))

    try:
        async for line in answer.lines():
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            try:
                event = orjson.loads(data)
            except orjson.JSONDecodeError:
                event = None
            if not isinstance(event, dict) or "error" in event:
                message = "the upstream's stream carried a line that is not a completion chunk"
                if isinstance(event, dict):
                    await response.write(b"data: " + redact(orjson.dumps(event)) + b"\n\n")
                else:
                    await response.write(error_event(message))
                answer.release()
                return await _close(response)
            if not template:
                template = {k: event.get(k) for k in ("id", "created", "model")}
            if not event.get("choices") and event.get("usage") is not None:
                usage = redact(line.strip()) + b"\n\n"
                continue
            for raw in event.get("choices") or []:
                if not isinstance(raw, dict):
                    continue
                index = raw.get("index", 0) if isinstance(raw.get("index", 0), int) else 0
                choice = choices.get(index)
                if choice is None:
                    choice = choices[index] = _Choice(index)
                    await response.write(chunk(template, index, {"role": "assistant", "content": ""}))
                if choice.done:
                    continue
                given = raw.get("delta")
                delta: dict[str, Any] = given if isinstance(given, dict) else {}
                content = delta.get("content")
                if isinstance(content, str) and content:
                    choice.text += content
                    choice.since += 1
                if delta.get("tool_calls") or delta.get("function_call"):
                    choice.add_calls(delta.get("tool_calls") or [{"index": 0, "function": delta["function_call"]}])
                    choice.since += 1
                choice.finish = raw.get("finish_reason") or choice.finish
                if choice.finish:
                    await finish(choice)
                elif choice.since >= policy.check_every_chunks and not hold_all:
                    await checked(choice)
            cut = [c for c in choices.values() if c.done and c.finish is None]
            if cut and len(choices) >= expected and all(c.done for c in choices.values()):
                answer.release()  # every choice is done, one at least cut: the rest of the stream is not read
                return await _close(response)
    except UpstreamUnreachable as exc:
        await response.write(error_event(f"the upstream's stream broke off ({exc}); nothing unchecked was sent"))
        return await _close(response)
    for choice in choices.values():
        if not choice.done:
            await finish(choice)
    if usage is not None:
        await response.write(usage)
    return await _close(response)
