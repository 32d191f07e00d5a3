"""Pieces the stages share: the per-call record fields and the message column type."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence, Sized
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import anyio
import polars as pl

from backends.errors import CaiError
from cai_async.engine import Engine
from cai_async.stages.unit import ItemExecutor, StageResult
from cai_async.store import CALL_FIELDS, MESSAGES, ShardWriter, call_fields, compact_shards, iter_shards, shard_columns

__all__ = [
    "CALL_FIELDS",
    "HEALABLE",
    "MESSAGES",
    "StageReport",
    "call_fields",
    "compact",
    "error_fields",
    "finished_ids",
    "gather_calls",
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
    of the skipped rows are errors (kept: the stage still did not finish them). Only the id and status columns
    are read."""
    names = shard_columns(writer.directory)
    if column not in names:
        return set(), 0
    done: set[str] = set()
    kept = 0
    error_class = pl.col("error_class").cast(pl.String) if "error_class" in names else pl.lit(None, pl.String)
    error = pl.col("error").cast(pl.String) if "error" in names else pl.lit(None, pl.String)
    kind = pl.when(error_class.fill_null("") == "").then(error.fill_null("").str.split(":").list.first()) \
        .otherwise(error_class)
    ok = (pl.col("status") == "ok").fill_null(False) if "status" in names else pl.lit(True)
    kept_error = pl.lit(False) if retry_errors else ~ok & ~kind.is_in(list(HEALABLE))
    for part in iter_shards(writer.directory, columns=[column, "status", "error", "error_class"]):
        rows = part.select(pl.col(column).cast(pl.String), ok.alias("ok"), kept_error.alias("kept")) \
            .filter(pl.col("ok") | pl.col("kept"))
        done.update(rows[column].to_list())
        kept += int(rows["kept"].sum())
    return done, kept


T = TypeVar("T")


@dataclass
class StageReport(StageResult):
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

    def counts(self) -> dict[str, int]:
        """The report's own counts beyond the common ones, for the run's summary."""
        return {}

    def to_json(self) -> dict[str, Any]:
        """Its ``summary.json`` entry: the common counts, the first 50 failures and their classes, then
        :meth:`counts`."""
        data: dict[str, Any] = {
            "total": self.total,
            "skipped_already_done": self.skipped,
            "errors_kept": self.errors_kept,
            "written": self.written,
            "failed": self.failed,
            "failures": self.failures[:50],
            "failure_classes": dict(Counter(f.get("class") or "error" for f in self.failures).most_common()),
            "stopped": self.stopped,
            "seconds": round(self.seconds, 3),
        }
        data.update(self.counts())
        return data

    def failure_count(self) -> int:
        """Rows failed (not written) and error rows kept from earlier runs (a report that records error rows
        adds them)."""
        return self.failed + self.errors_kept

    def stopped_early(self) -> str | None:
        """Why the run stopped before its last row (a budget reached)."""
        return self.stopped or None


class _HasId(Protocol):
    @property
    def id(self) -> str: ...


async def write_rows(
    engine: Engine,
    items: Sequence[_HasId] | Iterable[_HasId],
    make_row: Callable[[Any], Awaitable[dict[str, Any]]],
    writer: ShardWriter,
    report: StageReport,
    *,
    count: Callable[[dict[str, Any]], None] = lambda row: None,
    concurrency: int | None = None,
    total: int | None = None,
    executor: ItemExecutor | None = None,
) -> None:
    """Turn ``items`` into rows through the engine and write each as it finishes. A ``CaiError`` that ends
    an item is reported, not written (so a rerun retries it); ``count`` tallies the written rows. ``items`` may
    be an iterator (pulled as workers free up), then with its ``total``. ``executor``: where the items run
    (:attr:`StageContext.executor <cai_async.stages.unit.StageContext.executor>`, which may read ``items`` whole);
    default the engine."""
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
        size = total if total is not None else len(items) if isinstance(items, Sized) else None
        runner: ItemExecutor = engine if executor is None else executor
        batch = await runner.run_batch(items, make_row, on_result=on_result, total=size, concurrency=concurrency)
        report.stopped = batch.stopped
    finally:
        writer.flush()
        report.written = writer.written
        report.seconds = time.perf_counter() - start
    await compact(writer)


async def compact(writer: ShardWriter) -> None:
    """Merge the small shards of a stage that has ended into a few large ones (:func:`compact_shards`, in a
    worker thread), so later reads open a few files, not thousands."""
    await anyio.to_thread.run_sync(compact_shards, writer.directory)


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
