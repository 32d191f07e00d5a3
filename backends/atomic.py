"""The one atomic file writer, and the versioned JSON state files written with it.

A file is written under a hidden temporary name beside its target (``.NAME.tmp``), flushed to disk, renamed over
the target and its folder synced: a reader sees the old file or the new one, never half of one, even after a
``kill -9`` or a power cut. :func:`atomic_path` is for writers that take a path (Polars, a converter);
:func:`write_atomic` writes bytes or text.

JSON files kept as state (a run's ``summary.json``, the loop's ``loop.json``, a guard's ``calibration.json``, …)
carry ``format_version`` (:data:`JSON_FORMAT_VERSION`), as Parquet shards carry theirs in their metadata:
:func:`read_json` reads a file without it (written before versions) as version 0, and refuses one newer than
this build in one line. Files whose layout someone else fixes (TRL exports, Batch API input) are not versioned.

It lives on the bottom floor (``backends``, which imports nothing of ``cai_async``) so that the backends' state
(the Batch API journal's input files) and ``cai_async.store`` share it."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from backends.errors import ConfigError

__all__ = [
    "JSON_FORMAT_KEY",
    "JSON_FORMAT_VERSION",
    "atomic_path",
    "fsync_dir",
    "publish",
    "read_json",
    "write_atomic",
    "write_json",
    "write_jsonl",
]

JSON_FORMAT_KEY = "format_version"
"""The key of the format version in every JSON state file (the first key of its top-level object)."""
JSON_FORMAT_VERSION = 1
"""The JSON state format this build writes. 1: the first versioned format; files without the key (version 0, from
before versions) have the same layout. Bump it, and teach the readers the older ones, when a layout changes."""


def fsync_dir(directory: str | Path) -> None:
    """Sync ``directory`` so that a rename (or a delete) in it survives a crash."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: str | Path, target: str | Path) -> Path:
    """Sync the finished file ``tmp`` and rename it over ``target`` (in the same folder), then sync the folder."""
    target = Path(target)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, target)
    fsync_dir(target.parent)
    return target


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` (its folder created) to write the file to; when the block ends it is
    synced and renamed over ``path``; when the block raises it is removed and ``path`` is left as it was."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        yield tmp
        publish(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically; return ``path``."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return Path(path)


def write_json(path: str | Path, data: Any, *, versioned: bool = True, default: Callable[[Any], Any] = str) -> Path:
    """Write ``data`` as indented JSON atomically (``default``: what a value JSON has no type for becomes). An object
    kept as state carries ``format_version`` first (``versioned=False``: a file whose layout is someone else's)."""
    if versioned and isinstance(data, Mapping):
        data = {JSON_FORMAT_KEY: JSON_FORMAT_VERSION, **{k: v for k, v in data.items() if k != JSON_FORMAT_KEY}}
    return write_atomic(path, json.dumps(data, indent=2, default=default) + "\n")


def write_jsonl(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """``rows`` as JSON lines, written atomically (its folder created)."""
    return write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_json(path: str | Path) -> Any:
    """The JSON in ``path``, its ``format_version`` checked and removed: a file without one (from before versions)
    is read as it is; one newer than this build is a :class:`ConfigError` saying to upgrade cai-async. A file that
    is not JSON raises ``ValueError`` (``json.JSONDecodeError``), as ``json.loads`` does."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if isinstance(data, dict) and JSON_FORMAT_KEY in data:
        version = data.pop(JSON_FORMAT_KEY)
        if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version <= JSON_FORMAT_VERSION:
            raise ConfigError(
                f"{path}: JSON state format_version {version} is newer than this build of cai-async reads (up to "
                f"{JSON_FORMAT_VERSION}); upgrade cai-async (pip install -U cai-async) to read it"
            )
    return data
