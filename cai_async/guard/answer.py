"""What a client of the guard proxy gets for one request, in process: the input check's refusal, or the policy's
answer after the output check (refused, revised or flagged). ``cai eval``'s guarded models and the redteam
stage's ``through_guard`` attacks answer through it."""

from __future__ import annotations

from typing import Any

from backends.types import ChatRequest, ChatResult
from cai_async.guard.core import Guard

__all__ = ["guarded_answer"]


async def guarded_answer(guard: Guard, group: str, messages: list[dict[str, Any]], request: ChatRequest) -> tuple[
        str, ChatResult | None, str, str]:
    """``(text, the policy's ChatResult or None, guard decision, deciding tier)`` for ``request`` sent to the
    policy ``group`` behind ``guard``: the request's refusal when the input check blocks it (the policy is not
    called), else the policy's answer checked (and refused, revised or flagged) by the output check."""
    engine = guard.engine
    verdict = await guard.check_input(messages)
    if verdict.blocked:
        return verdict.refusal(), None, verdict.decision, verdict.tier
    answer = await engine.chat(group, request)
    out = await guard.check_output(messages, answer.text)
    if out.blocked:
        return out.refusal(), answer, out.decision, out.tier
    decision, tier = (out.decision, out.tier) if out.decision != "allow" or verdict.decision == "allow" else (
        verdict.decision, verdict.tier)
    return (out.revised if out.revised is not None else answer.text), answer, decision, tier
