"""Versioned on-disk formats: the request cache and the batch journal carry a schema version with named
migrations, so a run dir from before versions is migrated in place and one from a newer build is one clear line;
Parquet shards carry a format version in their metadata."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import anyio
import polars as pl
import pytest

from backends.batch_journal import MIGRATIONS as JOURNAL_MIGRATIONS, BatchJournal, Outcome
from backends.errors import ConfigError
from backends.migrations import migrate, schema_version
from cai_async.engine.cache import MIGRATIONS as CACHE_MIGRATIONS, RequestCache
from cai_async.store import FORMAT_KEY, FORMAT_VERSION, ShardWriter, read_shards
from tests.test_cli import cai

# The layouts written before versions (version 0), spelled out as they were, not taken from the code under test.
OLD_CACHE = ("CREATE TABLE IF NOT EXISTS calls (key TEXT PRIMARY KEY, kind TEXT NOT NULL, model TEXT NOT NULL,"
             " result BLOB NOT NULL, created REAL NOT NULL)")
OLD_JOURNAL = """
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


def _version(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return schema_version(db)
    finally:
        db.close()


def _set_version(path: Path, version: int) -> None:
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {version}")
    db.commit()
    db.close()


def test_cache_from_before_versions_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "run" / "cache.sqlite"
    path.parent.mkdir()
    db = sqlite3.connect(path)
    db.execute(OLD_CACHE)
    db.execute("INSERT INTO calls VALUES ('k1', 'chat', 'm', ?, 1.0)", (b'{"text": "kept"}',))
    db.commit()
    db.close()
    assert _version(path) == 0

    cache = RequestCache(path)
    assert cache.get("k1") == {"text": "kept"} and len(cache) == 1
    anyio.run(lambda: cache.store("k2", kind="chat", model="m", result={"text": "new"}))
    cache.close()
    assert _version(path) == len(CACHE_MIGRATIONS) >= 1

    again = RequestCache(path)  # opening a current file changes nothing
    assert again.get("k1") == {"text": "kept"} and again.get("k2") == {"text": "new"} and len(again) == 2
    again.close()
    assert _version(path) == len(CACHE_MIGRATIONS)


def test_new_cache_is_written_at_the_current_version(tmp_path: Path) -> None:
    RequestCache(tmp_path / "cache.sqlite").close()
    assert _version(tmp_path / "cache.sqlite") == len(CACHE_MIGRATIONS)


def test_cache_from_a_newer_build_is_one_clear_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    RequestCache(run / "cache.sqlite").close()
    _set_version(run / "cache.sqlite", len(CACHE_MIGRATIONS) + 1)
    with pytest.raises(ConfigError) as caught:
        RequestCache(run / "cache.sqlite")
    message = str(caught.value)
    assert str(run / "cache.sqlite") in message and f"version {len(CACHE_MIGRATIONS) + 1}" in message
    assert f"up to {len(CACHE_MIGRATIONS)}" in message and "\n" not in message

    out = cai("cache", "stats", str(run))  # the CLI says it in one line, as a user error
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cache.sqlite" in lines[0] and "newer than this build" in lines[0], out.stderr
    assert _version(run / "cache.sqlite") == len(CACHE_MIGRATIONS) + 1  # left as it was


def test_journal_from_before_versions_is_migrated_in_place(tmp_path: Path) -> None:
    folder = tmp_path / "batches" / "srv"
    folder.mkdir(parents=True)
    db = sqlite3.connect(folder / "journal.sqlite")
    db.executescript(OLD_JOURNAL)
    db.execute("INSERT INTO batches (local_id, state, requests, bytes, created, batch_id) "
               "VALUES ('b1', 'submitted', 2, 10, 1.0, 'batch_abc')")
    db.executemany("INSERT INTO members VALUES ('b1', ?)", [("r1",), ("r2",)])
    db.commit()
    db.close()

    journal = BatchJournal(folder)
    assert [(e.local_id, e.state, e.batch_id) for e in journal.unfinished()] == [("b1", "submitted", "batch_abc")]
    assert journal.in_flight() == {"r1": "b1", "r2": "b1"}
    journal.finish("b1", [Outcome("r1", payload={"ok": 1}), Outcome("r2", error="bad")], [], status="completed")
    assert journal.result("r1") == Outcome("r1", payload={"ok": 1})
    journal.close()
    assert _version(folder / "journal.sqlite") == len(JOURNAL_MIGRATIONS) >= 1
    assert BatchJournal(folder).summary()["succeeded"] == 1


def test_journal_from_a_newer_build_is_one_clear_line(tmp_path: Path) -> None:
    folder = tmp_path / "srv"
    BatchJournal(folder).close()
    assert _version(folder / "journal.sqlite") == len(JOURNAL_MIGRATIONS)
    _set_version(folder / "journal.sqlite", 99)
    with pytest.raises(ConfigError, match=r"journal\.sqlite: batch journal schema version 99 is newer than this "
                                          rf"build of cai-async supports \(up to {len(JOURNAL_MIGRATIONS)}"):
        BatchJournal(folder)


def test_migrations_run_in_order_once_and_roll_back_on_failure(tmp_path: Path) -> None:
    applied: list[str] = []

    def m001_a(db: sqlite3.Connection) -> None:
        applied.append("a")
        db.execute("CREATE TABLE a (x)")

    def m002_b(db: sqlite3.Connection) -> None:
        applied.append("b")
        db.execute("CREATE TABLE b (x)")

    def m003_broken(db: sqlite3.Connection) -> None:
        db.execute("CREATE TABLE c (x)")
        raise sqlite3.OperationalError("disk on fire")

    db = sqlite3.connect(tmp_path / "x.sqlite", isolation_level=None)
    assert migrate(db, [m001_a], path="x.sqlite", what="test") == ["m001_a"]
    assert migrate(db, [m001_a, m002_b], path="x.sqlite", what="test") == ["m002_b"]
    assert migrate(db, [m001_a, m002_b], path="x.sqlite", what="test") == []
    assert applied == ["a", "b"] and schema_version(db) == 2
    with pytest.raises(sqlite3.OperationalError, match="disk on fire"):
        migrate(db, [m001_a, m002_b, m003_broken], path="x.sqlite", what="test")
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert schema_version(db) == 2 and "c" not in tables and {"a", "b"} <= tables
    db.close()


def test_shards_carry_their_format_version(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path / "rows", shard_rows=2)
    writer.extend([{"id": "a", "v": 1}, {"id": "b", "v": 2}])
    writer.flush()
    (shard,) = sorted((tmp_path / "rows").glob("part-*.parquet"))
    assert pl.read_parquet_metadata(shard)[FORMAT_KEY] == str(FORMAT_VERSION)

    # a shard from before versions (no key) still reads, next to a current one
    pl.DataFrame({"id": ["c"], "v": [3]}).write_parquet(tmp_path / "rows" / "part-00001.parquet")
    assert read_shards(tmp_path / "rows")["id"].to_list() == ["a", "b", "c"]
    assert ShardWriter(tmp_path / "rows").existing_ids() == {"a", "b", "c"}


@pytest.mark.parametrize("version", [str(FORMAT_VERSION + 1), "2.0-beta"])
def test_shard_of_a_newer_format_is_one_clear_line(tmp_path: Path, version: str) -> None:
    pl.DataFrame({"id": ["a"]}).write_parquet(tmp_path / "part-00000.parquet")
    newer = tmp_path / "part-00001.parquet"
    pl.DataFrame({"id": ["b"]}).write_parquet(newer, metadata={FORMAT_KEY: version})
    with pytest.raises(ConfigError) as caught:
        read_shards(tmp_path)
    message = str(caught.value)
    assert message.startswith(f"{newer}: Parquet shard format version {version} is newer than this build")
    assert f"up to {FORMAT_VERSION}" in message and "\n" not in message
    with pytest.raises(ConfigError, match="newer than this build"):
        ShardWriter(tmp_path).existing_ids()  # resuming into it stops too, before anything is written
