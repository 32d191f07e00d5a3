"""Plain periodic progress lines for non-terminals; the CLI draws a rich bar from the same snapshot."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import anyio

from cai_async.engine.accounting import Accounting

__all__ = ["format_progress", "plain_progress"]


def format_progress(snapshot: dict[str, Any], elapsed_s: float, *, label: str = "cai") -> str:
    """One line: done/total, rate, ETA, tokens/s, cost, failures."""
    done = snapshot["done"] + snapshot["failed"]
    total = snapshot["total"]
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    eta = ""
    if total and rate > 0:
        eta = f" eta {max(0.0, (total - done) / rate):.0f}s"
    of_total = f"/{total}" if total else ""
    tokens_rate = snapshot["tokens"] / elapsed_s if elapsed_s > 0 else 0.0
    return (
        f"[{label}] {done}{of_total} done ({snapshot['failed']} failed, {snapshot['cache_hits']} cached) "
        f"{rate:.1f}/s{eta} {tokens_rate:.0f} tok/s ${snapshot['cost_usd']:.4f}"
    )


async def plain_progress(
    accounting: Accounting, *, interval_s: float = 10.0, stream: TextIO | None = None, label: str = "cai"
) -> None:
    """Print a progress line (named ``label``) every ``interval_s`` until cancelled."""
    out = stream or sys.stderr
    start = time.monotonic()
    while True:
        await anyio.sleep(interval_s)
        print(format_progress(accounting.snapshot(), time.monotonic() - start, label=label), file=out, flush=True)
