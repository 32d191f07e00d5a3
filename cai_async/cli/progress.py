"""Progress display for the CLI: a rich bar on a terminal, plain periodic lines otherwise."""

from __future__ import annotations

import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

import anyio
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from cai_async.engine import Engine, plain_progress
from cai_async.engine.progress import since, waiting_note

__all__ = ["progress_display"]


async def _rich(engine: Engine, label: str) -> None:
    columns = (
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:.1f}/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[tps]:.0f} tok/s ${task.fields[cost]:.4f} · {task.fields[failed]} failed"
                   "{task.fields[note]}"),
    )
    start, base = time.monotonic(), engine.accounting.snapshot()
    with Progress(*columns, transient=False, refresh_per_second=4) as bar:
        task = bar.add_task("calls", total=None, rate=0.0, tps=0.0, cost=0.0, failed=0, note="")
        try:
            while True:
                snap = since(engine.accounting.snapshot(), base)
                elapsed = max(1e-6, time.monotonic() - start)
                done = snap["done"] + snap["failed"]
                bar.update(
                    task, completed=done, total=snap["total"], rate=done / elapsed,
                    tps=snap["tokens"] / elapsed, cost=snap["cost_usd"], failed=snap["failed"],
                    note=waiting_note(snap),
                )
                await anyio.sleep(0.25)
        finally:
            snap = since(engine.accounting.snapshot(), base)
            bar.update(task, completed=snap["done"] + snap["failed"], total=snap["total"], failed=snap["failed"])


@asynccontextmanager
async def progress_display(
    engine: Engine, mode: Literal["auto", "rich", "plain", "off"] = "auto", *, interval_s: float = 10.0,
    label: str = "cai",
) -> AsyncIterator[None]:
    """Show progress of ``engine`` while the body runs, named ``label`` (the stage)."""
    if mode == "auto":
        mode = "rich" if sys.stderr.isatty() else "plain"
    if mode == "off":
        yield
        return
    async with anyio.create_task_group() as tg:
        if mode == "rich":
            tg.start_soon(_rich, engine, label)
        else:
            tg.start_soon(lambda: plain_progress(engine.accounting, interval_s=interval_s, label=label))
        try:
            yield
        finally:
            tg.cancel_scope.cancel()
