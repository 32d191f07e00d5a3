"""Pieces the stages share: the per-call record fields and the message column type."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import anyio
import polars as pl

from backends.errors import CaiError
from backends.types import ChatResult, ScoreResult
from cai_async.engine import BatchReport, Engine
from cai_async.store import MESSAGES, ShardWriter, read_shards

__all__ = [
    "CALL_FIELDS",
    "HEALABLE",
    "ITEM_EXECUTOR",
    "MESSAGES",
    "StageReport",
    "call_fields",
    "error_fields",
    "finished_ids",
    "gather_calls",
    "run_items",
    "write_rows",
]

HEALABLE = frozenset({"InvalidAnswer", "MissingLogprobs", "EmptyResponse"})
"""Error classes whose cause is on the endpoint's side (an unusable answer, no logprobs, empty text): a rerun
retries rows recorded with them; other recorded errors (a 400, a context too long) only with ``retry_errors``."""


def error_fields(error: CaiError) -> dict[str, str]:
    """The ``error`` and ``error_class`` fields of a row that recorded ``error``."""
    return {"error": f"{type(error).__name__}: {error}", "error_class": type(error).__name__}


def finished_ids(writer: ShardWriter, *, retry_errors: bool = False, column: str = "id") -> tuple[set[str], int]:
    """Ids of ``writer``'s directory a rerun skips: rows that finished ok, and rows recorded with an error a
    rerun cannot heal (:data:`HEALABLE` are retried; with ``retry_errors`` every error row is); and how many
    of the skipped rows are errors (kept: the stage still did not finish them)."""
    frame = read_shards(writer.directory)
    if frame.is_empty() or column not in frame.columns:
        return set(), 0
    if "status" not in frame.columns:
        return {str(v) for v in frame[column].to_list()}, 0
    done = set()
    kept = 0
    for row in frame.select(column, "status", *[c for c in ("error", "error_class") if c in frame.columns]).iter_rows(
        named=True
    ):
        if row["status"] != "ok":
            if retry_errors:
                continue
            kind = row.get("error_class") or str(row.get("error") or "").partition(":")[0]
            if kind in HEALABLE:
                continue
            kept += 1
        done.add(str(row[column]))
    return done, kept

T = TypeVar("T")

ITEM_EXECUTOR: ContextVar[Callable[..., Awaitable[BatchReport[Any]]] | None] = ContextVar(
    "cai_item_executor", default=None)
"""Set while a recipe runs with another executor (``executor: ray``, :mod:`cai_async.scale`): it takes
``Engine.run_batch``'s arguments (and the engine first), runs the items elsewhere and hands each outcome to
``on_result`` here."""


async def run_items(
    engine: Engine,
    items: Sequence[Any],
    call: Callable[[Any], Awaitable[Any]],
    *,
    on_result: Callable[[Any, Any], Awaitable[None] | None],
    total: int | None = None,
    concurrency: int | None = None,
) -> BatchReport[Any]:
    """``engine.run_batch`` over a stage's items, or, under :data:`ITEM_EXECUTOR`, the same on another executor."""
    executor = ITEM_EXECUTOR.get()
    if executor is not None:
        return await executor(engine, items, call, on_result=on_result, total=total, concurrency=concurrency)
    return await engine.run_batch(items, call, on_result=on_result, total=total, concurrency=concurrency)


@dataclass
class StageReport:
    """What a stage run did: rows asked for, already done (some of them kept errors), written, failed (not
    written: a rerun retries them, with reasons), why it stopped early (budget), and how long it took."""

    total: int = 0
    skipped: int = 0
    errors_kept: int = 0
    """Of ``skipped``: rows recorded with an error by an earlier run and not retried (see ``finished_ids``)."""
    written: int = 0
    failed: int = 0
    failures: list[dict[str, str]] = field(default_factory=list)
    stopped: str | None = None
    seconds: float = 0.0


class _HasId(Protocol):
    @property
    def id(self) -> str: ...


async def write_rows(
    engine: Engine,
    items: Sequence[_HasId],
    make_row: Callable[[Any], Awaitable[dict[str, Any]]],
    writer: ShardWriter,
    report: StageReport,
    *,
    count: Callable[[dict[str, Any]], None] = lambda row: None,
    concurrency: int | None = None,
) -> None:
    """Turn ``items`` into rows through the engine and write each as it finishes. A ``CaiError`` that ends
    an item is reported, not written (so a rerun retries it); ``count`` tallies the written rows."""
    start = time.perf_counter()

    def on_result(item: _HasId, outcome: dict[str, Any] | CaiError) -> None:
        if isinstance(outcome, CaiError):
            report.failed += 1
            report.failures.append({"id": item.id, "error": f"{type(outcome).__name__}: {outcome}",
                                    "class": type(outcome).__name__})
            return
        if outcome.get("status", "ok") != "ok":
            report.failures.append({"id": item.id, "error": str(outcome.get("error")),
                                    "class": str(outcome.get("error_class") or "")})
        count(outcome)
        writer.add(outcome)

    try:
        batch = await run_items(engine, items, make_row, on_result=on_result, total=len(items),
                                concurrency=concurrency)
        report.stopped = batch.stopped
    finally:
        writer.flush()
        report.written = writer.written
        report.seconds = time.perf_counter() - start


async def gather_calls(calls: Sequence[Callable[[], Awaitable[T]]], *, together: bool) -> list[T | CaiError]:
    """Run an item's independent calls (K samples, principles × orders) and return each outcome in order, a
    ``CaiError`` in place of a result. ``together``: all at once — more parallelism online, and one round in
    batch mode; otherwise one after another, so a local model reuses the KV cache of their shared prefix."""
    outcomes: list[T | CaiError | None] = [None] * len(calls)

    async def one(index: int) -> None:
        try:
            outcomes[index] = await calls[index]()
        except CaiError as exc:
            outcomes[index] = exc

    if together:
        async with anyio.create_task_group() as tg:
            for index in range(len(calls)):
                tg.start_soon(one, index)
    else:
        for index in range(len(calls)):
            await one(index)
    return [outcome for outcome in outcomes if outcome is not None]


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
