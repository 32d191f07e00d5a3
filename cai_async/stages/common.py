"""Pieces the stages share: the per-call record fields and the message column type."""

from __future__ import annotations

from typing import Any

import polars as pl

from backends.types import ChatResult, ScoreResult
from cai_async.store import MESSAGES

__all__ = ["CALL_FIELDS", "MESSAGES", "call_fields"]


CALL_FIELDS: dict[str, pl.DataType] = {
    "endpoint": pl.String(),
    "model": pl.String(),
    "prompt_tokens": pl.Int64(),
    "completion_tokens": pl.Int64(),
    "latency_s": pl.Float64(),
    "cached": pl.Boolean(),
    "finish_reason": pl.String(),
}
"""What is kept of every call: where it ran, what it cost, how long it took, whether the cache served it."""


def call_fields(prefix: str, result: ChatResult | ScoreResult | None) -> dict[str, Any]:
    """``CALL_FIELDS`` of ``result`` with their names prefixed (all ``None`` when there was no call)."""
    if result is None:
        return {f"{prefix}_{k}": None for k in CALL_FIELDS}
    return {
        f"{prefix}_endpoint": result.endpoint,
        f"{prefix}_model": result.model,
        f"{prefix}_prompt_tokens": result.usage.prompt_tokens,
        f"{prefix}_completion_tokens": result.usage.completion_tokens,
        f"{prefix}_latency_s": result.latency_s,
        f"{prefix}_cached": result.cached,
        f"{prefix}_finish_reason": result.finish_reason if isinstance(result, ChatResult) else result.method,
    }
