"""What every process that worked on a run directory spent, kept in ``<run dir>/accounting.sqlite``: a run's true
total across kills and resumes, and what the processes that did not finish cost."""

from __future__ import annotations

import os
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

__all__ = ["COUNTERS", "RunLedger", "read_ledger"]

COUNTERS = ("calls", "failures", "retries", "rate_limited", "cache_hits", "prompt_tokens", "completion_tokens",
            "cost_usd")
"""The per-process counters kept (summed over endpoints)."""

_COLUMNS = ", ".join(f"{name} {'REAL' if name == 'cost_usd' else 'INTEGER'} NOT NULL DEFAULT 0" for name in COUNTERS)


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE IF NOT EXISTS processes (id TEXT PRIMARY KEY, pid INTEGER NOT NULL, started REAL NOT "
               f"NULL, updated REAL NOT NULL, finished INTEGER NOT NULL DEFAULT 0, {_COLUMNS})")
    return db


class RunLedger:
    """This process's row in a run directory's ledger; :meth:`save` replaces it with the current counters."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = _connect(self.path)
        self.id = uuid.uuid4().hex
        self._started = time.time()

    def save(self, counters: dict[str, float], *, finished: bool = False) -> None:
        """Store this process's counters (called about once a second and at the end)."""
        values = [counters.get(name, 0) for name in COUNTERS]
        self._db.execute(
            f"INSERT OR REPLACE INTO processes (id, pid, started, updated, finished, {', '.join(COUNTERS)}) "
            f"VALUES (?, ?, ?, ?, ?, {', '.join('?' for _ in COUNTERS)})",
            (self.id, os.getpid(), self._started, time.time(), int(finished), *values),
        )

    def totals(self) -> dict[str, Any]:
        """The run's totals over every process (see :func:`read_ledger`)."""
        return _totals(self._db, current=self.id)

    def close(self) -> None:
        self._db.close()


def _totals(db: sqlite3.Connection, *, current: str | None = None) -> dict[str, Any]:
    rows = db.execute(
        f"SELECT id, finished, {', '.join(COUNTERS)}, pid, started FROM processes ORDER BY started").fetchall()
    total: dict[str, Any] = {name: 0 for name in COUNTERS}
    unfinished: dict[str, Any] = {"processes": 0, "calls": 0, "cost_usd": 0.0}
    for row in rows:
        counters = dict(zip(COUNTERS, row[2:-2], strict=True))
        for name in COUNTERS:
            total[name] += counters[name]
        if not row[1] and row[0] != current:
            unfinished["processes"] += 1
            unfinished["calls"] += counters["calls"]
            unfinished["cost_usd"] += counters["cost_usd"]
    total["cost_usd"] = round(total["cost_usd"], 6)
    unfinished["cost_usd"] = round(unfinished["cost_usd"], 6)
    total["tokens"] = total["prompt_tokens"] + total["completion_tokens"]
    # one command may open several engines (a recipe's data stages, then its evaluation): count processes by pid
    return {"processes": len({row[-2] for row in rows}), "sessions": len(rows), **total, "unfinished": unfinished}


def read_ledger(run_dir: str | Path) -> dict[str, Any] | None:
    """A run directory's totals over every process that worked on it: counters summed, and ``unfinished``
    (processes killed or crashed: how many, their calls and dollars); ``None`` when it has no ledger."""
    path = Path(run_dir) / "accounting.sqlite"
    if not path.is_file():
        return None
    db = _connect(path)
    try:
        return _totals(db)
    finally:
        db.close()
