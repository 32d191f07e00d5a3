"""Persistent request cache in SQLite (WAL): a repeated call is a free hit, which makes resume cheap."""

from __future__ import annotations

import hashlib
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import orjson

from backends.errors import ConfigError
from backends.migrations import Migration, migrate

__all__ = ["MIGRATIONS", "RequestCache", "request_key"]


def m001_calls(db: sqlite3.Connection) -> None:
    """The ``calls`` table (a file from before versions has it already)."""
    db.execute(
        "CREATE TABLE IF NOT EXISTS calls (key TEXT PRIMARY KEY, kind TEXT NOT NULL, model TEXT NOT NULL,"
        " result BLOB NOT NULL, created REAL NOT NULL)"
    )


MIGRATIONS: tuple[Migration, ...] = (m001_calls,)
"""The cache file's schema, as named migrations (see :mod:`backends.migrations`); append, never edit."""


def request_key(model: str, normalized_request: dict[str, Any]) -> str:
    """A stable hash of the model and the normalized request (messages, sampling options, seed)."""
    blob = orjson.dumps({"model": model, **normalized_request}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(blob).hexdigest()


@dataclass
class _Flush:
    """One group commit: set when its rows are on disk (or failed)."""

    done: anyio.Event = field(default_factory=anyio.Event)
    error: ConfigError | None = None


class RequestCache:
    """Finished calls by request key. :meth:`store` returns only once the call is committed, so a kill -9 keeps
    it; the calls that finish in the same moment share one transaction (group commit)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._pending: list[tuple[str, str, str, bytes, float]] = []
            self._flush: _Flush | None = None
            migrate(self._db, MIGRATIONS, path=self.path, what="request cache")
        except sqlite3.DatabaseError as exc:
            raise ConfigError(
                f"request cache {self.path}: cannot open ({exc}); delete it or pick another path"
            ) from None

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored result for ``key``, or ``None``."""
        row = self._db.execute("SELECT result FROM calls WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        value: dict[str, Any] = orjson.loads(row[0])
        return value

    async def store(self, key: str, *, kind: str, model: str, result: dict[str, Any]) -> None:
        """Store one finished call and return once it is committed. The first caller of a moment waits one
        scheduler turn, then commits every call that finished meanwhile in one transaction (group commit):
        less than half the cost per call of a commit each, and still nothing is used before it is on disk."""
        self._pending.append((key, kind, model, orjson.dumps(result), time.time()))
        flush = self._flush
        if flush is not None:  # a commit is being gathered: ride along
            await flush.done.wait()
            if flush.error is not None:
                raise flush.error
            return
        flush = self._flush = _Flush()
        try:
            with anyio.CancelScope(shield=True):
                await anyio.lowlevel.checkpoint()  # let the calls finishing now add theirs
            rows, self._pending, self._flush = self._pending, [], None
            try:
                with self._db:
                    self._db.execute("BEGIN")
                    self._db.executemany(
                        "INSERT OR REPLACE INTO calls (key, kind, model, result, created) VALUES (?, ?, ?, ?, ?)", rows
                    )
            except sqlite3.Error as exc:
                flush.error = ConfigError(f"request cache {self.path}: cannot write ({exc}); free disk space or "
                                          "turn the cache off (--no-cache)")
                raise flush.error from None
        finally:
            if self._flush is flush:
                self._flush = None
            flush.done.set()

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM calls").fetchone()[0])

    def clear(self) -> int:
        """Delete every entry; return how many there were."""
        count = len(self)
        self._db.execute("DELETE FROM calls")
        return count

    def close(self) -> None:
        self._db.close()
