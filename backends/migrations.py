"""Schema versions for the SQLite files a run keeps (the request cache, the batch journal).

Each file has an ordered list of named migrations (functions that change the schema); the file's ``PRAGMA
user_version`` is how many of them it has had. Opening a file applies the ones it lacks, in one transaction, so a
file written before it had a version (version 0, today's layout or an empty file) is brought up to date in
place; a file with a version this build does not know (written by a newer cai-async) is one clear error instead
of a silent misreading. To change a schema, append a migration; never edit or reorder the applied ones."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path

from backends.errors import ConfigError

__all__ = ["Migration", "migrate", "schema_version"]

Migration = Callable[[sqlite3.Connection], None]
"""One schema change, named by its function (``m001_calls``); it runs inside the migration's transaction."""


def schema_version(db: sqlite3.Connection) -> int:
    """The number of migrations ``db`` has had (0 for a file written before versions, or a new one)."""
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def _check(version: int, migrations: Sequence[Migration], path: Path, what: str) -> None:
    if version > len(migrations):
        raise ConfigError(
            f"{path}: {what} schema version {version} is newer than this build of cai-async supports (up to "
            f"{len(migrations)}, {migrations[-1].__name__ if migrations else 'none'}); use a newer cai-async or "
            "another run dir"
        )


def migrate(db: sqlite3.Connection, migrations: Sequence[Migration], *, path: str | Path, what: str) -> list[str]:
    """Apply the migrations ``db`` lacks, in order, in one transaction (so two processes opening the same file
    migrate it once); return the names applied. ``db`` must be in autocommit mode (``isolation_level=None``).
    Raises :class:`ConfigError` naming ``path`` when the file's version is newer than ``migrations`` knows."""
    version = schema_version(db)
    _check(version, migrations, Path(path), what)
    if version == len(migrations):
        return []
    db.execute("BEGIN IMMEDIATE")
    try:
        version = schema_version(db)  # another process may have migrated it meanwhile
        _check(version, migrations, Path(path), what)
        pending = migrations[version:]
        for migration in pending:
            migration(db)
        db.execute(f"PRAGMA user_version = {len(migrations):d}")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return [migration.__name__ for migration in pending]
