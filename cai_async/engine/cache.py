"""Persistent request cache in SQLite (WAL): a repeated call is a free hit, which makes resume cheap."""

from __future__ import annotations

import hashlib
import sqlite3
import time
from pathlib import Path
from typing import Any

import orjson

from backends.errors import ConfigError

__all__ = ["RequestCache", "request_key"]


def request_key(model: str, normalized_request: dict[str, Any]) -> str:
    """A stable hash of the model and the normalized request (messages, sampling options, seed)."""
    blob = orjson.dumps({"model": model, **normalized_request}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(blob).hexdigest()


class RequestCache:
    """Finished calls by request key. Every put is committed at once, so a kill -9 keeps it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS calls (key TEXT PRIMARY KEY, kind TEXT NOT NULL, model TEXT NOT NULL,"
                " result BLOB NOT NULL, created REAL NOT NULL)"
            )
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

    def put(self, key: str, *, kind: str, model: str, result: dict[str, Any]) -> None:
        """Store one finished call."""
        self._db.execute(
            "INSERT OR REPLACE INTO calls (key, kind, model, result, created) VALUES (?, ?, ?, ?, ?)",
            (key, kind, model, orjson.dumps(result), time.time()),
        )

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM calls").fetchone()[0])

    def clear(self) -> int:
        """Delete every entry; return how many there were."""
        count = len(self)
        self._db.execute("DELETE FROM calls")
        return count

    def close(self) -> None:
        self._db.close()
