"""Read prompts from JSONL, JSON, CSV or Parquet, with the prompt column named in config."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from backends.errors import ConfigError

__all__ = ["PromptRow", "load_prompts", "prompt_id"]


@dataclass(frozen=True, slots=True)
class PromptRow:
    """One input prompt with a stable id (from the id column, else a hash of the text)."""

    id: str
    prompt: str


def prompt_id(text: str) -> str:
    """Stable id of a prompt text."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def _read(path: Path) -> pl.DataFrame:
    suffixes = "".join(path.suffixes[-2:])
    try:
        if path.suffix == ".parquet":
            return pl.read_parquet(path)
        if path.suffix == ".csv":
            return pl.read_csv(path)
        if path.suffix in (".jsonl", ".ndjson") or suffixes == ".jsonl.gz":
            return pl.read_ndjson(path)
        if path.suffix == ".json":
            return pl.read_json(path)
    except (pl.exceptions.PolarsError, OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read prompts ({exc})") from None
    raise ConfigError(f"{path}: unsupported prompt file type; use .jsonl, .json, .csv or .parquet")


def load_prompts(path: str | Path, *, column: str = "prompt", id_column: str | None = None) -> list[PromptRow]:
    """Prompts from a file; errors name the file and the missing column."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{file}: prompt file not found")
    if file.stat().st_size == 0:
        raise ConfigError(f"{file}: prompt file is empty")
    frame = _read(file)
    if frame.is_empty():
        raise ConfigError(f"{file}: prompt file has no rows")
    if column not in frame.columns:
        raise ConfigError(f"{file}: no column {column!r} (columns: {', '.join(frame.columns)}); set prompt_column")
    if id_column is not None and id_column not in frame.columns:
        raise ConfigError(f"{file}: no id column {id_column!r} (columns: {', '.join(frame.columns)})")
    rows: list[PromptRow] = []
    seen: set[str] = set()
    for record in frame.iter_rows(named=True):
        text = record[column]
        if not isinstance(text, str) or not text.strip():
            continue
        row_id = str(record[id_column]) if id_column else prompt_id(text)
        if row_id in seen:
            continue
        seen.add(row_id)
        rows.append(PromptRow(id=row_id, prompt=text))
    if not rows:
        raise ConfigError(f"{file}: column {column!r} holds no non-empty text")
    return rows
