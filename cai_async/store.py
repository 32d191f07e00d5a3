"""Parquet shards written with atomic renames, so a crash never leaves a half-written file; resume by id.

Shards are ``part-NNNNN.parquet``; :func:`compact_shards` merges a run of them into one ``part-AAAAA-BBBBB.parquet``
that replaces shards ``AAAAA`` to ``BBBBB``, keeping only each id's latest row. Readers skip a shard whose number
lies inside such a range, so a compaction cut short between its rename and its deletes still reads every row
exactly once. Readers stream: :func:`scan_shards` is a lazy frame (column projection, ``sink_parquet``),
:func:`iter_shards` yields slices.

Every file is written by the one atomic writer (:mod:`backends.atomic`); JSON state files (:func:`write_json`) carry
``format_version`` as shards carry ``FORMAT_KEY``, and :func:`read_json` refuses one newer than this build."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import polars as pl

from backends.atomic import (
    JSON_FORMAT_KEY,
    JSON_FORMAT_VERSION,
    atomic_path,
    fsync_dir,
    publish,
    read_json,
    write_json,
    write_jsonl,
)
from backends.errors import ConfigError
from backends.types import ChatResult, ScoreResult

__all__ = [
    "CALL_FIELDS",
    "FORMAT_KEY",
    "FORMAT_VERSION",
    "JSON_FORMAT_KEY",
    "JSON_FORMAT_VERSION",
    "MESSAGES",
    "ShardWriter",
    "compact_shards",
    "count_shard_rows",
    "iter_shards",
    "read_json",
    "read_shards",
    "scan_shards",
    "shard_columns",
    "shard_files",
    "sink_parquet_atomic",
    "write_json",
    "write_jsonl",
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


_SHARD = re.compile(r"^part-(\d{5,})(?:-(\d{5,}))?\.parquet$")

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
    with atomic_path(path) as tmp:
        frame.write_parquet(tmp, metadata={FORMAT_KEY: str(FORMAT_VERSION)})
    return Path(path)


def sink_parquet_atomic(frame: pl.LazyFrame, path: str | Path) -> Path:
    """Stream ``frame`` into ``path`` (Polars' streaming ``sink_parquet``: memory stays flat in the rows)
    through a temporary file, fsync and rename."""
    with atomic_path(path) as tmp:
        frame.sink_parquet(tmp, metadata={FORMAT_KEY: str(FORMAT_VERSION)}, row_group_size=_GROUP_ROWS)
    return Path(path)


_GROUP_ROWS = 2048
"""Rows per Parquet row group in sunk and compacted files: what a streaming reader holds at once."""


def _span(path: Path) -> tuple[int, int]:
    match = _SHARD.match(path.name)
    assert match is not None
    return int(match.group(1)), int(match.group(2) or match.group(1))


def _all_shards(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return [p for p in directory.iterdir() if _SHARD.match(p.name)]


def _shards(directory: Path) -> list[Path]:
    """The live shards in order: a shard inside a compacted range (left by a compaction cut short) is skipped."""
    live: list[Path] = []
    reach = -1
    for path in sorted(_all_shards(directory), key=lambda p: (_span(p)[0], -_span(p)[1])):
        end = _span(path)[1]
        if end <= reach:
            continue
        live.append(path)
        reach = max(reach, end)
    return live


def shard_files(directory: str | Path) -> list[Path]:
    """The shard files a reader reads, in order (compacted ranges in place of the shards they replace)."""
    return _shards(Path(directory))


def count_shard_rows(path: str | Path) -> int:
    """Rows of one Parquet file, from its footer."""
    return int(pl.scan_parquet(path).select(pl.len()).collect().item())


def _unreadable(directory: str | Path, exc: Exception) -> ConfigError:
    return ConfigError(f"{directory}: unreadable Parquet shard ({exc}); move it away and rerun")


def _kept_rows(files: list[Path], unique_by: str | None, keep: Literal["first", "last"]) -> pl.Series | None:
    """Row numbers (over ``files`` in order) of the copies kept, or ``None`` when no id repeats. Reads only
    the ``unique_by`` column, a file at a time."""
    if not unique_by:
        return None
    parts = []
    for file in files:
        if unique_by in pl.read_parquet_schema(file):
            parts.append(pl.read_parquet(file, columns=[unique_by])[unique_by].cast(pl.String))
        else:
            parts.append(pl.Series(unique_by, [None] * count_shard_rows(file), dtype=pl.String))
    ids = pl.concat(parts).to_frame(unique_by) if parts else pl.DataFrame()
    if ids.is_empty() or ids[unique_by].null_count() == ids.height or not ids[unique_by].is_duplicated().any():
        return None
    return ids.with_row_index("__row").unique(subset=[unique_by], keep=keep, maintain_order=True)["__row"]


def _checked(directory: str | Path) -> list[Path]:
    files = _shards(Path(directory))
    for file in files:
        _check_format(file)
    return files


def scan_shards(
    directory: str | Path, *, columns: Sequence[str] | None = None, unique_by: str | None = "id",
    keep: Literal["first", "last"] = "last",
) -> pl.LazyFrame | None:
    """All shards of a directory as one lazy frame (``None`` when there are none), with only ``columns`` (those
    present) read; rows repeated by ``unique_by`` keep their ``keep`` copy, as :func:`read_shards`. Only the
    ``unique_by`` column is read up front (to find repeats); the rest streams when the frame is collected or
    sunk (``sink_parquet``). Many small shards cost memory in a lazy scan: compacted stages have few."""
    try:
        files = _checked(directory)
        if not files:
            return None
        frame = pl.concat([pl.scan_parquet(f) for f in files], how="diagonal_relaxed")
        names = frame.collect_schema().names()
        rows = _kept_rows(files, unique_by if unique_by in names else None, keep)
        if rows is not None:
            frame = frame.with_row_index("__row").filter(pl.col("__row").is_in(rows.implode())).drop("__row")
    except pl.exceptions.PolarsError as exc:
        raise _unreadable(directory, exc) from None
    if columns is not None:
        frame = frame.select([c for c in columns if c in names])
    return frame


def shard_columns(directory: str | Path) -> list[str]:
    """The columns of a directory's shards (all of them, in first-seen order), from the files' footers."""
    try:
        return list(dict.fromkeys(name for f in _shards(Path(directory)) for name in pl.read_parquet_schema(f)))
    except pl.exceptions.PolarsError as exc:
        raise _unreadable(directory, exc) from None


def iter_shards(
    directory: str | Path, *, columns: Sequence[str] | None = None, unique_by: str | None = "id",
    keep: Literal["first", "last"] = "last",
) -> Iterator[pl.DataFrame]:
    """The rows of :func:`scan_shards` a shard at a time (a compacted shard holds at most a few thousand rows),
    each with the same ``columns`` (those any shard has; missing ones null): memory holds one shard."""
    try:
        files = _checked(directory)
        names = shard_columns(directory)
        wanted = [c for c in (columns if columns is not None else names) if c in names]
        rows = _kept_rows(files, unique_by if unique_by in names else None, keep)
        kept = None if rows is None else rows.to_frame("__row")
        offset = 0
        for file in files:
            schema = pl.read_parquet_schema(file)
            part = pl.read_parquet(file, columns=[c for c in wanted if c in schema]) if any(
                c in schema for c in wanted) else pl.DataFrame({"__n": [None] * count_shard_rows(file)})
            height = part.height
            part = part.with_columns(pl.lit(None).alias(c) for c in wanted if c not in part.columns).select(wanted)
            if kept is not None:
                mine = kept.filter(pl.col("__row").is_between(offset, offset + height - 1))["__row"] - offset
                part = part.with_row_index("__i").filter(pl.col("__i").is_in(mine.implode())).drop("__i")
            offset += height
            if part.height:
                yield part
    except pl.exceptions.PolarsError as exc:
        raise _unreadable(directory, exc) from None


def read_shards(
    directory: str | Path, *, unique_by: str | None = "id", keep: Literal["first", "last"] = "last"
) -> pl.DataFrame:
    """All shards of a directory as one frame; rows repeated by ``unique_by`` keep their ``keep`` copy (the
    last: a rerun that retried an error row wrote the newer one). Reads every row: prefer :func:`scan_shards`
    or :func:`iter_shards` where the rows may be many."""
    frame = scan_shards(directory, unique_by=unique_by, keep=keep)
    if frame is None:
        return pl.DataFrame()
    try:
        return frame.collect()
    except pl.exceptions.PolarsError as exc:
        raise _unreadable(directory, exc) from None


def _superseded(files: list[Path], unique_by: str | None) -> dict[Path, pl.Series]:
    """For each of ``files`` (in order) holding rows a later row of the same ``unique_by`` id replaces (an error
    row a rerun healed, or recorded again), the row numbers within that file of those rows. Rows without an id
    are never replaced. Reads only the ``unique_by`` column."""
    if not unique_by:
        return {}
    parts = []
    for number, file in enumerate(files):
        rows = count_shard_rows(file)
        ids = (pl.read_parquet(file, columns=[unique_by])[unique_by].cast(pl.String)
               if unique_by in pl.read_parquet_schema(file) else pl.Series(unique_by, [None] * rows, pl.String))
        parts.append(pl.DataFrame({"file": [number] * rows, "row": range(rows), "id": ids},
                                  schema={"file": pl.Int64, "row": pl.Int64, "id": pl.String}))
    if not parts:
        return {}
    stale = pl.concat(parts).filter(pl.col("id").is_not_null() & ~pl.col("id").is_last_distinct())
    return {files[number]: group["row"] for (number,), group in stale.group_by("file")}


def _merge(paths: list[Path], target: Path, stale: dict[Path, pl.Series]) -> None:
    """Write ``paths`` (at most ``target_rows`` rows together) as one Parquet file, rows in order less the
    ``stale`` ones, columns aligned to the shards' common schema: memory holds one merged file, whatever the
    stage's size."""
    def kept(path: Path) -> pl.DataFrame:
        frame = pl.read_parquet(path)
        if path not in stale:
            return frame
        return frame.with_row_index("__row").filter(~pl.col("__row").is_in(stale[path].implode())).drop("__row")

    frame = pl.concat([kept(p) for p in paths], how="diagonal_relaxed")
    frame.write_parquet(target, metadata={FORMAT_KEY: str(FORMAT_VERSION)}, row_group_size=_GROUP_ROWS)
    del frame


def compact_shards(directory: str | Path, *, target_rows: int = 4096, unique_by: str | None = "id") -> int:
    """Merge runs of small shards (under ``target_rows // 4`` rows) into ``part-AAAAA-BBBBB.parquet`` files of up
    to ``target_rows`` rows, rows in order; return how many shards were replaced or rewritten. Only each
    ``unique_by`` id's latest row is kept (the one readers read): the error rows a rerun healed go, so the files
    read with Polars or ``datasets`` hold each id once. A shard left out of the runs (a large one) that holds
    such rows is rewritten in place without them.

    Kill-safe: each merged or rewritten file is written under a hidden temporary name, fsynced, renamed into
    place (from then on readers skip the shards it replaces), and only then are those removed; a compaction
    cut short leaves either the old shards alone or the merged file and shards readers skip, which the next
    compaction removes. Either way readers see each id's latest row, as before."""
    folder = Path(directory)
    for stale_tmp in folder.glob(".compact-*.tmp") if folder.is_dir() else []:
        stale_tmp.unlink(missing_ok=True)
    live = set(_shards(folder))
    for covered in [p for p in _all_shards(folder) if p not in live]:
        covered.unlink(missing_ok=True)  # a compaction was cut short after its rename
    ordered = sorted(live, key=_span)
    for path in ordered:
        _check_format(path)
    try:
        stale = _superseded(ordered, unique_by)
    except pl.exceptions.PolarsError as exc:
        raise _unreadable(folder, exc) from None
    runs: list[list[tuple[Path, int]]] = [[]]
    for path in ordered:
        rows = count_shard_rows(path)
        if rows >= target_rows // 4 or (runs[-1] and sum(n for _, n in runs[-1]) + rows > target_rows):
            runs.append([])
        if rows < target_rows // 4:
            runs[-1].append((path, rows))
    merged = {p for run in runs if len(run) >= 2 for p, _ in run}
    replaced = 0
    for run in runs:
        if len(run) < 2:
            continue
        paths = [p for p, _ in run]
        start, end = _span(paths[0])[0], _span(paths[-1])[1]
        tmp = folder / f".compact-{start:05d}-{end:05d}.tmp"
        _write_merged(paths, tmp, folder / f"part-{start:05d}-{end:05d}.parquet", stale)
        for path in paths:
            path.unlink()
        fsync_dir(folder)
        replaced += len(paths)
    for path in [p for p in ordered if p in stale and p not in merged]:  # rewritten in place, less its old rows
        start, end = _span(path)
        _write_merged([path], folder / f".compact-{start:05d}-{end:05d}.tmp", path, stale)
        replaced += 1
    return replaced


def _write_merged(paths: list[Path], tmp: Path, target: Path, stale: dict[Path, pl.Series]) -> None:
    try:
        _merge(paths, tmp, stale)
    except pl.exceptions.PolarsError as exc:
        tmp.unlink(missing_ok=True)
        raise _unreadable(tmp.parent, exc) from None
    publish(tmp, target)


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
        self._next = max((_span(p)[1] for p in _all_shards(self.directory)), default=-1) + 1
        self.written = 0

    def existing_ids(self, column: str = "id") -> set[str]:
        """Ids already written by earlier runs (only that column is read)."""
        frame = scan_shards(self.directory, columns=[column], unique_by=None)
        if frame is None or column not in frame.collect_schema().names():
            return set()
        return {str(v) for v in frame.collect()[column].to_list()}

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
