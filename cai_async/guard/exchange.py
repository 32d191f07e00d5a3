"""One view of an exchange, the only thing every tier of the guard reads: each piece of text a model could be
shown — every message of every role, its ``name``, each text part of every content shape the OpenAI API allows,
tool-call names and arguments (and the strings inside JSON arguments, ``\\u`` escapes undone), tool results,
the tool definitions offered, ``response_format`` schemas and any field of the request the guard does not know —
and, for answers, every choice with its tool calls. Each piece keeps its role and where it came from.

Also here: the bounded views the tiers get of long text (head and tail, windows). The judge's fenced prompts are
in :mod:`cai_async.judging` with every other question."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from backends.errors import CaiError

__all__ = [
    "ExchangeError",
    "Part",
    "ReadRequest",
    "answer_parts",
    "conversation",
    "head_tail",
    "joined_text",
    "request_parts",
    "string_leaves",
    "windows",
]

# Fields of a chat request that carry no text a model reads (numbers, flags, routing); every other field's
# strings are checked, so a server-specific extension (``documents``, template arguments) cannot smuggle text.
_NOT_TEXT = frozenset({
    "model", "stream", "stream_options", "temperature", "top_p", "n", "max_tokens", "max_completion_tokens",
    "stop", "seed", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "logit_bias", "user",
    "tool_choice", "parallel_tool_calls", "metadata", "store", "service_tier", "modalities", "audio",
    "reasoning_effort", "prediction", "min_p", "top_k", "repetition_penalty",
})
_MEDIA = frozenset({"image_url", "input_audio", "file", "image", "audio"})
_MAX_DEPTH = 32


class ExchangeError(CaiError, ValueError):
    """A request or answer whose shape the OpenAI API does not allow (the proxy answers 400); ``param`` names the
    field. Also a ``ValueError``, as it was before it joined the error tree."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class Part:
    """One piece of text of an exchange: the ``role`` of its message (``tools`` for tool definitions, ``request``
    for other request fields), ``where`` in the message it sits (``content``, ``name``, ``tool_call``,
    ``tool_definition``, ``field``), the message's index (for an answer: the choice's), and the text."""

    role: str
    where: str
    message: int
    text: str


class ReadRequest(list[Part]):
    """The parts of a request read once (:func:`request_parts`), to pass to the checks of its answers."""


def string_leaves(value: Any, *, depth: int = 0) -> Iterator[str]:
    """Every string in a JSON value, keys included; below ``_MAX_DEPTH`` levels the rest is read as its JSON text
    (nothing is left out: nesting cannot hide text)."""
    if isinstance(value, str):
        yield value
    elif depth >= _MAX_DEPTH and isinstance(value, (Mapping, list, tuple)):
        yield json.dumps(value, ensure_ascii=False)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield str(key)
            yield from string_leaves(item, depth=depth + 1)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from string_leaves(item, depth=depth + 1)


def _leaves_text(value: Any) -> str:
    return " ".join(string_leaves(value))


def _arguments_text(arguments: Any) -> str:
    """A tool call's arguments as the guard reads them: the raw string, then the strings inside when it is JSON
    (so ``\\u0062omb`` is read as ``bomb``)."""
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except ValueError:
            return arguments
        inner = _leaves_text(parsed)
        return arguments if not inner or inner == arguments else f"{arguments}\n{inner}"
    return _leaves_text(arguments)


def _content_texts(content: Any, param: str) -> list[str]:
    """The text of a message's ``content``: a string, or a list of parts (plain strings, ``{"type": "text",
    "text": …}``, ``refusal`` parts, and the text of unknown part types); media parts carry no text."""
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise ExchangeError(f"{param} must be text or a list of content parts", param)
    texts: list[str] = []
    for index, part in enumerate(content):
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict):
            kind = part.get("type")
            if kind in _MEDIA:
                continue
            for key in ("text", "refusal"):
                if key in part:
                    if not isinstance(part[key], str):
                        raise ExchangeError(f"{param}[{index}].{key} must be text", f"{param}[{index}].{key}")
                    texts.append(part[key])
            if kind not in ("text", "refusal", None):  # an unknown part: whatever text it carries is read
                texts.append(_leaves_text({k: v for k, v in part.items() if k not in ("type", "text", "refusal")}))
        else:
            raise ExchangeError(f"{param}[{index}] must be a content part object or text", f"{param}[{index}]")
    return [t for t in texts if t]


def _tool_calls(message: Mapping[str, Any], role: str, index: int, param: str) -> Iterator[Part]:
    calls = message.get("tool_calls")
    if calls is not None and not isinstance(calls, list):
        raise ExchangeError(f"{param}.tool_calls must be a list", f"{param}.tool_calls")
    legacy = message.get("function_call")
    for call in [*(calls or []), *([{"function": legacy}] if legacy is not None else [])]:
        if not isinstance(call, dict):
            raise ExchangeError(f"{param}.tool_calls items must be objects", f"{param}.tool_calls")
        inner = call.get("function")
        function: dict[str, Any] = inner if isinstance(inner, dict) else call
        name = str(function.get("name") or "")
        arguments = _arguments_text(function.get("arguments", ""))
        yield Part(role, "tool_call", index, f"{name}({arguments})" if name else arguments)


def message_parts(message: Any, index: int, *, param: str = "messages") -> list[Part]:
    """The parts of one chat message (see :class:`Part`)."""
    at = f"{param}[{index}]"
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise ExchangeError(f"{at} must be an object with a 'role'", at)
    role = message["role"]
    parts = [Part(role, "content", index, text) for text in _content_texts(message.get("content"), f"{at}.content")]
    name = message.get("name")
    if name is not None:
        parts.append(Part(role, "name", index, str(name)))
    parts += _tool_calls(message, role, index, at)
    for key, value in message.items():  # fields a server might render that the API does not define
        if key not in ("role", "content", "name", "tool_calls", "function_call", "tool_call_id") and value:
            text = _leaves_text(value)
            if text:
                parts.append(Part(role, "field", index, text))
    return parts


def request_parts(messages: Any, request: Mapping[str, Any] | None = None) -> ReadRequest:
    """Every part of a request: its messages, then the tools it offers, ``response_format`` and any other field
    with text (``request`` is the whole body, when there is one). Raises :class:`ExchangeError` for shapes the
    API does not allow."""
    if not isinstance(messages, list) or not messages:
        raise ExchangeError("'messages' must be a non-empty list of {role, content}", "messages")
    parts = [part for index, message in enumerate(messages) for part in message_parts(message, index)]
    for key, value in (request or {}).items():
        if key == "messages" or key in _NOT_TEXT or value is None:
            continue
        text = _leaves_text(value)
        if text:
            parts.append(Part("tools" if key in ("tools", "functions") else "request",
                              "tool_definition" if key in ("tools", "functions") else "field", -1, text))
    return ReadRequest(parts)


def answer_parts(answer: str | Mapping[str, Any] | None, *, choice: int = 0) -> list[Part]:
    """The parts of one answer: plain text, or an assistant message (content, refusal, tool calls)."""
    if answer is None:
        return []
    if isinstance(answer, str):
        return [Part("assistant", "content", choice, answer)] if answer else []
    parts = message_parts({"role": "assistant", **answer}, choice, param="choices")
    refusal = answer.get("refusal")
    return parts + ([Part("assistant", "content", choice, refusal)] if isinstance(refusal, str) and refusal else [])


def joined_text(parts: Sequence[Part]) -> str:
    """All the parts' text, one after another (rules read this, so a phrase split across messages is found)."""
    return "\n".join(p.text for p in parts)


_NAMES = {"user": "Human", "assistant": "Assistant", "system": "System", "developer": "System", "tool": "Tool result",
          "function": "Tool result", "tools": "Tools offered", "request": "Other request fields"}


def conversation(parts: Sequence[Part]) -> list[dict[str, str]]:
    """The parts as plain ``{role, content}`` messages, one per message: the text parts of its content run
    together as the model reads them, then its name, tool calls and other fields, each on a line of its own (what
    the classifier and the judge read)."""
    out: list[dict[str, str]] = []
    key: tuple[int, str] | None = None
    previous = ""
    for part in parts:
        label = {"name": "[name] ", "tool_call": "[calls tool] ", "field": "[field] "}.get(part.where, "")
        text = label + part.text
        if key == (part.message, part.role) and out:
            joint = "" if part.where == previous == "content" else "\n"
            out[-1]["content"] += joint + text
        else:
            role = part.role if part.role in ("user", "assistant", "system") else _NAMES.get(part.role, part.role)
            out.append({"role": role, "content": text})
            key = (part.message, part.role)
        previous = part.where
    return out


def head_tail(text: str, limit: int) -> str:
    """``text`` when it fits in ``limit`` characters, else its head and tail with a marker between them."""
    if len(text) <= limit:
        return text
    half = max(1, (limit - 40) // 2)
    return f"{text[:half]}\n[… {len(text) - 2 * half} characters left out …]\n{text[-half:]}"


def windows(text: str, size: int, *, overlap: int = 200) -> list[str]:
    """``text`` cut into pieces of at most ``size`` characters, each overlapping the one before by ``overlap`` (so a
    phrase on a cut is whole in one of them)."""
    if len(text) <= size:
        return [text]
    step = max(1, size - overlap)
    return [text[start:start + size] for start in range(0, len(text) - overlap, step)]
