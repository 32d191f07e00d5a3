"""Plain periodic progress lines for non-terminals; the CLI draws a rich bar from the same snapshot."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import anyio

from cai_async.engine.accounting import Accounting

__all__ = ["format_progress", "plain_progress", "since", "waiting_note"]


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
        f"{rate:.1f}/s{eta} {tokens_rate:.0f} tok/s ${snapshot['cost_usd']:.4f}{waiting_note(snapshot)}"
    )


def waiting_note(snapshot: dict[str, Any]) -> str:
    """The countdown of endpoints rate limited past ``retry.max_wait_s`` (``""`` when none waits)."""
    waits = snapshot.get("waiting") or {}
    return "".join(f" · {name} rate limited, back in {_clock(left)}" for name, left in waits.items())


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def since(snapshot: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """``snapshot`` counted from ``base`` (an earlier snapshot): what one stage did, for its own display."""
    shifted = dict(snapshot)
    for key in ("done", "failed", "cache_hits", "tokens", "cost_usd"):
        shifted[key] = snapshot[key] - base[key]
    if snapshot["total"] is not None:
        shifted["total"] = max(0, snapshot["total"] - base["done"] - base["failed"])
    return shifted


async def plain_progress(
    accounting: Accounting, *, interval_s: float = 10.0, stream: TextIO | None = None, label: str = "cai"
) -> None:
    """Print a progress line (named ``label``) every ``interval_s`` until cancelled."""
    out = stream or sys.stderr
    start, base = time.monotonic(), accounting.snapshot()
    while True:
        await anyio.sleep(interval_s)
        line = format_progress(since(accounting.snapshot(), base), time.monotonic() - start, label=label)
        print(line, file=out, flush=True)
