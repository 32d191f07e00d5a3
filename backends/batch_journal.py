"""The Batch API journal: what was submitted, where it stands, and every request's final outcome.

One SQLite file (WAL, committed per change) in the backend's state folder, next to each batch's input file and
the output and error files it came back with. Everything is written *before* the remote step it describes, so a
process killed at any point can be rerun and find its batches instead of paying for them again:

- ``prepared``: input file written locally; ``uploading``: an upload may have reached the provider (look for
  the file by name before uploading again); ``uploaded``: file id known; ``creating``: a batch may exist (look
  for it by the metadata tag before creating again); ``submitted``: batch id known, poll it; ``done``: outcomes
  recorded.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from backends.atomic import write_atomic
from backends.migrations import Migration, migrate

__all__ = ["MIGRATIONS", "BatchEntry", "BatchJournal", "Outcome"]

_TABLES = """
CREATE TABLE IF NOT EXISTS batches (
    local_id TEXT PRIMARY KEY, state TEXT NOT NULL, requests INTEGER NOT NULL, bytes INTEGER NOT NULL,
    created REAL NOT NULL, file_id TEXT, batch_id TEXT, status TEXT, detail TEXT
);
CREATE TABLE IF NOT EXISTS members (
    local_id TEXT NOT NULL, custom_id TEXT NOT NULL, PRIMARY KEY (local_id, custom_id)
);
CREATE INDEX IF NOT EXISTS members_by_id ON members (custom_id);
CREATE TABLE IF NOT EXISTS results (
    custom_id TEXT PRIMARY KEY, ok INTEGER NOT NULL, payload BLOB, error TEXT, local_id TEXT
);
CREATE TABLE IF NOT EXISTS failures (
    custom_id TEXT PRIMARY KEY, attempts INTEGER NOT NULL, error TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS unknown (
    local_id TEXT NOT NULL, custom_id TEXT, line BLOB NOT NULL
);
"""


def m001_tables(db: sqlite3.Connection) -> None:
    """The journal's tables (a journal from before versions has them already)."""
    for statement in _TABLES.split(";"):
        if statement.strip():
            db.execute(statement)


MIGRATIONS: tuple[Migration, ...] = (m001_tables,)
"""The journal's schema, as named migrations (see :mod:`backends.migrations`); append, never edit."""


@dataclass(frozen=True, slots=True)
class BatchEntry:
    """One batch as the journal knows it."""

    local_id: str
    state: str
    requests: int
    bytes: int
    created: float
    file_id: str | None
    batch_id: str | None
    status: str | None
    detail: str | None

    @property
    def filename(self) -> str:
        """The input file's name, as uploaded (how an interrupted upload is found again)."""
        return f"cai-{self.local_id}.jsonl"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one request in a finished batch: ``payload`` (success), or ``error`` and whether
    another batch may try it again (``retry``: expired, cancelled, missing, server errors)."""

    custom_id: str
    payload: dict[str, Any] | None = None
    error: str | None = None
    retry: bool = False


class BatchJournal:
    """The persistent record of one endpoint's batches (see the module docstring)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.folder / "journal.sqlite", isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        migrate(self._db, MIGRATIONS, path=self.folder / "journal.sqlite", what="batch journal")

    def close(self) -> None:
        self._db.close()

    def input_path(self, local_id: str) -> Path:
        return self.folder / f"{local_id}.input.jsonl"

    def prepare(self, lines: list[tuple[str, bytes]]) -> BatchEntry:
        """Write a new batch's input file (``(custom_id, JSONL line)`` pairs) and record it as ``prepared``."""
        local_id = time.strftime("%Y%m%d%H%M%S") + "-" + uuid.uuid4().hex[:8]
        data = b"".join(line for _, line in lines)
        path = self.input_path(local_id)
        write_atomic(path, data)
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute(
                "INSERT INTO batches (local_id, state, requests, bytes, created) VALUES (?, 'prepared', ?, ?, ?)",
                (local_id, len(lines), len(data), time.time()),
            )
            self._db.executemany("INSERT OR IGNORE INTO members VALUES (?, ?)", [(local_id, c) for c, _ in lines])
        entry = self.get(local_id)
        assert entry is not None
        return entry

    def get(self, local_id: str) -> BatchEntry | None:
        row = self._db.execute(
            "SELECT local_id, state, requests, bytes, created, file_id, batch_id, status, detail FROM batches "
            "WHERE local_id = ?", (local_id,)
        ).fetchone()
        return BatchEntry(*row) if row else None

    def update(self, local_id: str, **fields: Any) -> BatchEntry:
        """Change a batch's ``state``, ids, provider status or detail (committed before returning)."""
        names = ", ".join(f"{name} = ?" for name in fields)
        self._db.execute(f"UPDATE batches SET {names} WHERE local_id = ?", (*fields.values(), local_id))
        entry = self.get(local_id)
        assert entry is not None
        return entry

    def entries(self) -> list[BatchEntry]:
        """Every batch, oldest first."""
        rows = self._db.execute(
            "SELECT local_id, state, requests, bytes, created, file_id, batch_id, status, detail FROM batches "
            "ORDER BY created"
        ).fetchall()
        return [BatchEntry(*row) for row in rows]

    def unfinished(self) -> list[BatchEntry]:
        """Batches not yet ``done``, oldest first: a rerun drives these to the end before submitting anew."""
        return [entry for entry in self.entries() if entry.state != "done"]

    def members(self, local_id: str) -> list[str]:
        return [row[0] for row in self._db.execute("SELECT custom_id FROM members WHERE local_id = ?", (local_id,))]

    def in_flight(self) -> dict[str, str]:
        """``custom_id → local_id`` for every request in a batch that is not done."""
        rows = self._db.execute(
            "SELECT m.custom_id, m.local_id FROM members m JOIN batches b USING (local_id) WHERE b.state != 'done'"
        )
        return {custom_id: local_id for custom_id, local_id in rows}

    def bodies(self, local_id: str, wanted: set[str]) -> dict[str, dict[str, Any]]:
        """Request bodies of ``wanted`` custom_ids, read back from the batch's input file."""
        found: dict[str, dict[str, Any]] = {}
        with open(self.input_path(local_id), "rb") as handle:
            for raw in handle:
                line = orjson.loads(raw)
                if line["custom_id"] in wanted:
                    found[line["custom_id"]] = line["body"]
        return found

    def result(self, custom_id: str) -> Outcome | None:
        """The final outcome of a request, if one is recorded."""
        row = self._db.execute("SELECT ok, payload, error FROM results WHERE custom_id = ?", (custom_id,)).fetchone()
        if row is None:
            return None
        ok, payload, error = row
        return Outcome(custom_id, payload=orjson.loads(payload)) if ok else Outcome(custom_id, error=error)

    def attempts(self, custom_id: str) -> tuple[int, str | None]:
        """How many batches a request has failed in, and the last error."""
        row = self._db.execute("SELECT attempts, error FROM failures WHERE custom_id = ?", (custom_id,)).fetchone()
        return (int(row[0]), str(row[1])) if row else (0, None)

    def finish(
        self,
        local_id: str,
        outcomes: list[Outcome],
        unknown: list[tuple[str | None, bytes]],
        *,
        status: str,
    ) -> None:
        """Record a finished batch in one transaction: final results (successes and permanent failures), one
        more failed attempt for each request another batch may try, the unknown lines; the batch becomes
        ``done``. A request out of attempts has no final result, so raising ``max_attempts`` lets it retry."""
        with self._db:
            self._db.execute("BEGIN")
            for outcome in outcomes:
                if outcome.retry:
                    self._db.execute(
                        "INSERT INTO failures VALUES (?, 1, ?) ON CONFLICT (custom_id) DO UPDATE "
                        "SET attempts = attempts + 1, error = excluded.error",
                        (outcome.custom_id, outcome.error),
                    )
                    continue
                self._db.execute(
                    "INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?)",
                    (outcome.custom_id, outcome.payload is not None,
                     orjson.dumps(outcome.payload) if outcome.payload is not None else None, outcome.error, local_id),
                )
            self._db.executemany(
                "INSERT INTO unknown VALUES (?, ?, ?)", [(local_id, custom_id, line) for custom_id, line in unknown]
            )
            self._db.execute("UPDATE batches SET state = 'done', status = ? WHERE local_id = ?", (status, local_id))

    def summary(self) -> dict[str, Any]:
        """Counts for run reports: batches by state and provider status, results, failures, unknown lines."""
        def count(sql: str) -> int:
            return int(self._db.execute(sql).fetchone()[0])

        statuses = dict(self._db.execute("SELECT COALESCE(status, state), COUNT(*) FROM batches GROUP BY 1"))
        return {
            "batches": count("SELECT COUNT(*) FROM batches"),
            "in_flight": count("SELECT COUNT(*) FROM batches WHERE state != 'done'"),
            "statuses": statuses,
            "succeeded": count("SELECT COUNT(*) FROM results WHERE ok"),
            "failed": count("SELECT COUNT(*) FROM results WHERE NOT ok"),
            "failed_attempts": count("SELECT COALESCE(SUM(attempts), 0) FROM failures"),
            "unknown_lines": count("SELECT COUNT(*) FROM unknown"),
        }
