"""Parquet shards written with atomic renames, so a crash never leaves a half-written file; resume by id."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import polars as pl

from backends.errors import ConfigError
from backends.types import ChatResult, ScoreResult

__all__ = [
    "CALL_FIELDS",
    "FORMAT_KEY",
    "FORMAT_VERSION",
    "MESSAGES",
    "ShardWriter",
    "call_fields",
    "read_shards",
    "write_parquet_atomic",
]

MESSAGES = pl.List(pl.Struct({"role": pl.String, "content": pl.String}))
"""A conversation column: a list of ``{role, content}``."""

CALL_FIELDS: dict[str, pl.DataType] = {
    "endpoint": pl.String(),
    "model": pl.String(),
    "prompt_tokens": pl.Int64(),
    "completion_tokens": pl.Int64(),
    "latency_s": pl.Float64(),
    "cached": pl.Boolean(),
    "finish_reason": pl.String(),
}
"""What is kept of every call: where it ran, what it cost, how long it took, whether the cache served it."""


def call_fields(prefix: str, result: ChatResult | ScoreResult | None) -> dict[str, Any]:
    """``CALL_FIELDS`` of ``result`` with their names prefixed (all ``None`` when there was no call)."""
    if result is None:
        return {f"{prefix}_{k}": None for k in CALL_FIELDS}
    return {
        f"{prefix}_endpoint": result.endpoint,
        f"{prefix}_model": result.model,
        f"{prefix}_prompt_tokens": result.usage.prompt_tokens,
        f"{prefix}_completion_tokens": result.usage.completion_tokens,
        f"{prefix}_latency_s": result.latency_s,
        f"{prefix}_cached": result.cached,
        f"{prefix}_finish_reason": result.finish_reason if isinstance(result, ChatResult) else result.method,
    }

_SHARD = re.compile(r"^part-(\d{5,})\.parquet$")

FORMAT_KEY = "cai_async.format"
"""The key of the format version in every Parquet file's key-value metadata."""
FORMAT_VERSION = 1
"""The format this build writes. 1: the first versioned format; files without the key (version 0, from before
versions) have the same layout. Bump it, and teach :func:`read_shards` the older ones, when a layout changes."""


def _check_format(path: Path) -> None:
    """Refuse a shard written in a format newer than this build reads (or in one it cannot tell)."""
    version = pl.read_parquet_metadata(path).get(FORMAT_KEY, "0")
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise ConfigError(
            f"{path}: Parquet shard format version {version} is newer than this build of cai-async reads (up to "
            f"{FORMAT_VERSION}); use a newer cai-async or another run dir"
        )


def write_parquet_atomic(frame: pl.DataFrame, path: str | Path) -> Path:
    """Write ``frame`` to ``path`` through a temporary file, fsync and rename."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    frame.write_parquet(tmp, metadata={FORMAT_KEY: str(FORMAT_VERSION)})
    with tmp.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, target)
    return target


def _shards(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _SHARD.match(p.name))


def read_shards(
    directory: str | Path, *, unique_by: str | None = "id", keep: Literal["first", "last"] = "last"
) -> pl.DataFrame:
    """All shards of a directory as one frame; rows repeated by ``unique_by`` keep their ``keep`` copy (the
    last: a rerun that retried an error row wrote the newer one)."""
    files = _shards(Path(directory))
    if not files:
        return pl.DataFrame()
    try:
        for file in files:
            _check_format(file)
        frame = pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed")
    except pl.exceptions.PolarsError as exc:
        raise ConfigError(f"{directory}: unreadable Parquet shard ({exc}); move it away and rerun") from None
    if unique_by and unique_by in frame.columns:
        frame = frame.unique(subset=[unique_by], keep=keep, maintain_order=True)
    return frame


class ShardWriter:
    """Buffers rows and writes them as ``part-NNNNN.parquet`` shards of ``shard_rows`` rows, or sooner when the
    oldest buffered row has waited ``flush_every_s`` seconds (so a slow run loses little to a crash)."""

    def __init__(
        self,
        directory: str | Path,
        *,
        shard_rows: int = 256,
        schema: dict[str, Any] | None = None,
        flush_every_s: float | None = None,
    ):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shard_rows = shard_rows
        self.flush_every_s = flush_every_s
        self._oldest = 0.0
        self._schema = schema
        self._rows: list[dict[str, Any]] = []
        existing = [int(m.group(1)) for p in _shards(self.directory) if (m := _SHARD.match(p.name))]
        self._next = max(existing, default=-1) + 1
        self.written = 0

    def existing_ids(self, column: str = "id") -> set[str]:
        """Ids already written by earlier runs."""
        frame = read_shards(self.directory, unique_by=None)
        if frame.is_empty() or column not in frame.columns:
            return set()
        return {str(v) for v in frame[column].to_list()}

    def add(self, row: dict[str, Any]) -> None:
        if not self._rows:
            self._oldest = time.monotonic()
        self._rows.append(row)
        overdue = self.flush_every_s is not None and time.monotonic() - self._oldest >= self.flush_every_s
        if len(self._rows) >= self.shard_rows or overdue:
            self.flush()

    def extend(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            self.add(row)

    def flush(self) -> None:
        """Write buffered rows as one new shard."""
        if not self._rows:
            return
        frame = pl.DataFrame(self._rows, schema=self._schema, strict=False)
        write_parquet_atomic(frame, self.directory / f"part-{self._next:05d}.parquet")
        self._next += 1
        self.written += len(self._rows)
        self._rows = []
