"""An external guard model as a tier: a Llama-Guard-style prompt whose unsafe-content categories S1..Sn are the
guard's own principles (their names and questions), sent to an OpenAI-compatible model through the engine, and
its answer read as ``safe`` or ``unsafe`` + the violated categories (``unsafe\\nS2,S3``)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from backends.types import ChatRequest

if TYPE_CHECKING:
    from cai_async.engine import Engine
    from cai_async.guard.verdicts import GuardPrinciple

__all__ = ["ask_external_guard", "guard_categories", "llama_guard_prompt", "parse_guard_answer"]


def guard_categories(principles: Sequence[GuardPrinciple]) -> str:
    """The categories block: ``S<i>: <Name>.`` and the principle's question under it, one per principle."""
    return "\n".join(f"S{index}: {p.name.replace('-', ' ').replace('_', ' ').capitalize()}.\n{p.question}"
                     for index, p in enumerate(principles, start=1))


def llama_guard_prompt(principles: Sequence[GuardPrinciple], messages: Sequence[dict[str, Any]],
                       answer: str | None, direction: Literal["input", "output"]) -> str:
    """Llama Guard's task prompt, with the constitution's principles as its categories; the last ``User``
    message is assessed for ``input``, the ``Agent``'s answer for ``output``."""
    role = "User" if direction == "input" else "Agent"
    names = {"user": "User", "assistant": "Agent"}
    turns = [f"{names.get(str(m.get('role')), 'User')}: {m.get('content') or ''}" for m in messages
             if m.get("role") != "system"]
    if direction == "output" and answer is not None:
        turns.append(f"Agent: {answer}")
    conversation = "\n\n".join(turns)
    return (
        f"Task: Check if there is unsafe content in '{role}' messages in conversations according our safety "
        "policy with the below categories.\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\n"
        f"{guard_categories(principles)}\n<END UNSAFE CONTENT CATEGORIES>\n\n<BEGIN CONVERSATION>\n\n"
        f"{conversation}\n\n<END CONVERSATION>\n\nProvide your safety assessment for ONLY THE LAST {role} message "
        "in the above conversation:\n - First line must read 'safe' or 'unsafe'.\n - If unsafe, a second line must "
        "include a comma-separated list of violated categories."
    )


_CATEGORY = re.compile(r"\bS(\d+)\b")


def parse_guard_answer(text: str, count: int) -> tuple[bool, list[int]] | None:
    """``(unsafe, the 0-based indexes of the categories named)`` from a guard's answer, or ``None`` when the
    first line is neither ``safe`` nor ``unsafe`` (an answer that cannot be read). Categories out of range are
    left out."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    first = lines[0].lower().rstrip(".") if lines else ""
    if first == "safe":
        return False, []
    if first != "unsafe":
        return None
    named = [int(n) - 1 for n in _CATEGORY.findall(" ".join(lines[1:]))]
    return True, sorted({n for n in named if 0 <= n < count})


async def ask_external_guard(engine: Engine, role: str, principles: Sequence[GuardPrinciple],
                             messages: Sequence[dict[str, Any]], answer: str | None,
                             direction: Literal["input", "output"], *,
                             max_tokens: int) -> tuple[bool, list[int]] | None:
    """Put the prompt to ``role`` (greedy) and read its answer (see :func:`parse_guard_answer`)."""
    prompt = llama_guard_prompt(principles, messages, answer, direction)
    result = await engine.chat(role, ChatRequest([{"role": "user", "content": prompt}], max_tokens=max_tokens,
                                                 temperature=0.0))
    return parse_guard_answer(result.text, len(principles))
