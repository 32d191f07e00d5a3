"""Read prompts from JSONL, JSON, CSV, Parquet or a saved Hugging Face dataset, with the column named in config.

A prompt cell is a single user turn (text), a conversation (a list of ``{role, content}`` ending with a user
turn), or an hh-rlhf style transcript (``"\\n\\nHuman: …\\n\\nAssistant: …"``)."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import polars as pl
from pydantic import Field

from backends.errors import ConfigError
from backends.strict import StrictModel

__all__ = [
    "PromptRow", "PromptSource", "is_uri", "iter_prompts", "load_prompts", "parse_conversation", "prompt_id",
    "read_table",
]

_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


@dataclass(frozen=True, slots=True)
class PromptRow:
    """One input: a stable id, the conversation (ending with a user turn) and, optionally, a given response."""

    id: str
    prompt: str
    """The last user turn."""
    messages: tuple[dict[str, str], ...] = ()
    """The whole conversation; a single prompt is one user turn."""
    response: str | None = None
    """A response the user already has (``response_column``); then no initial call is made."""
    extra: tuple[tuple[str, Any], ...] = ()
    """Values of the ``extra_columns`` asked for, as (column, value) pairs."""

    def conversation(self) -> list[dict[str, str]]:
        return [dict(m) for m in self.messages] or [{"role": "user", "content": self.prompt}]


def prompt_id(content: str | list[dict[str, str]]) -> str:
    """Stable id of a prompt text or conversation."""
    text = content if isinstance(content, str) else json.dumps(content, sort_keys=True, ensure_ascii=False)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def parse_conversation(value: Any) -> list[dict[str, str]] | None:
    """A prompt cell as chat turns, or ``None`` when it holds no usable text."""
    if isinstance(value, str):
        if not value.strip():
            return None
        if value.startswith("\n\nHuman:"):
            parts = _HH_TURN.split(value)[1:]
            turns = [
                {"role": "user" if who == "Human" else "assistant", "content": text.strip()}
                for who, text in zip(parts[::2], parts[1::2], strict=True)
            ]
            while turns and turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
                turns.pop()
            return turns or None
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        turns = [{"role": str(m.get("role")), "content": str(m.get("content") or "")} for m in value]
        if any(t["role"] not in ("system", "user", "assistant") for t in turns):
            raise ValueError("roles must be system, user or assistant")
        return turns
    return None


def _read_hf_saved(path: Path, split: str | None) -> pl.DataFrame:
    """A dataset written by ``datasets``' ``save_to_disk`` (Arrow stream files), read without ``datasets``."""
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        chosen = split or ("train" if "train" in splits else splits[0])
        if chosen not in splits:
            raise ConfigError(f"{path}: no split {chosen!r} (splits: {', '.join(splits)}); set split")
        path = path / chosen
    state = json.loads((path / "state.json").read_text())
    files = [path / item["filename"] for item in state["_data_files"]]
    return pl.concat([pl.read_ipc_stream(f) for f in files], how="diagonal_relaxed")


def is_uri(path: str | Path) -> bool:
    """Whether ``path`` is a URI (``s3://``, ``gs://``, ``hdfs://``, ``file://``…) rather than a local path."""
    return isinstance(path, str) and "://" in path


def _read_uri(uri: str) -> pl.DataFrame:
    """A JSONL/JSON/CSV/Parquet table at a URI, through pyarrow's file systems or, for other schemes, fsspec."""
    name = uri.split("?")[0].removesuffix(".gz")
    try:
        from pyarrow import fs as arrow_fs

        try:
            filesystem, inner = arrow_fs.FileSystem.from_uri(uri)
            with filesystem.open_input_stream(inner) as stream:  # .gz is decompressed by its extension
                data = stream.read()
        except Exception:  # a scheme pyarrow lacks: fsspec's (hf://, http://…), when installed
            import fsspec

            with fsspec.open(uri, "rb", compression="infer") as handle:
                data = handle.read()
        buffer = io.BytesIO(data)
        if name.endswith(".parquet"):
            return pl.read_parquet(buffer)
        if name.endswith(".csv"):
            return pl.read_csv(buffer)
        if name.endswith(".json"):
            return pl.read_json(buffer)
        return pl.read_ndjson(buffer)
    except ImportError:
        raise ConfigError(f"{uri}: reading prompts from a URI needs pyarrow (pip install 'cai-async[scale]')") from None
    except Exception as exc:
        raise ConfigError(f"{uri}: cannot read prompts ({type(exc).__name__}: {exc})") from None


def read_table(path: str | Path, *, split: str | None = None) -> pl.DataFrame:
    """Any supported prompt file (or URI: ``s3://``, ``gs://``, ``file://``…) as a frame; errors name the file
    and say what to fix."""
    if is_uri(path):
        return _read_uri(str(path))
    file = Path(path)
    if file.is_dir():
        if not (file / "state.json").is_file() and not (file / "dataset_dict.json").is_file():
            raise ConfigError(f"{file}: a folder must be a saved Hugging Face dataset (save_to_disk)")
    elif not file.is_file():
        raise ConfigError(f"{file}: prompt file not found")
    elif file.stat().st_size == 0:
        raise ConfigError(f"{file}: prompt file is empty")
    name = file.name.removesuffix(".gz")
    try:
        if file.is_dir():
            return _read_hf_saved(file, split)
        if name.endswith(".parquet"):
            return pl.read_parquet(file)
        if name.endswith(".csv"):
            return pl.read_csv(file)
        if name.endswith((".jsonl", ".ndjson")):
            return pl.read_ndjson(file)
        if name.endswith(".json"):
            return pl.read_json(file)
    except (pl.exceptions.PolarsError, OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{file}: cannot read prompts ({type(exc).__name__}: {exc})") from None
    raise ConfigError(f"{file}: unsupported prompt file type; use .jsonl, .json, .csv, .parquet or a dataset folder")


def _scan_table(file: str | Path, *, split: str | None = None) -> pl.LazyFrame:
    """A prompt file as a lazy frame: JSONL, CSV and Parquet are scanned (read a slice at a time as rows are
    used), other kinds and URIs read whole by :func:`read_table`."""
    if isinstance(file, Path) and file.is_file() and file.stat().st_size > 0:
        if file.name.endswith(".parquet"):
            return pl.scan_parquet(file)
        if file.name.endswith((".jsonl", ".ndjson")):
            return pl.scan_ndjson(file)
        if file.name.endswith(".csv"):
            return pl.scan_csv(file)
    return read_table(file, split=split).lazy()


def _records(frame: pl.LazyFrame, file: str | Path) -> Iterator[dict[str, Any]]:
    try:
        for batch in frame.collect_batches(chunk_size=4096):
            yield from batch.iter_rows(named=True)
    except (pl.exceptions.PolarsError, OSError, ValueError) as exc:
        raise ConfigError(f"{file}: cannot read prompts ({type(exc).__name__}: {exc})") from None


def load_prompts(
    path: str | Path,
    *,
    column: str = "prompt",
    id_column: str | None = None,
    response_column: str | None = None,
    split: str | None = None,
    last_assistant_turn: Literal["skip", "drop", "as_response"] = "skip",
    extra_columns: tuple[str, ...] = (),
) -> list[PromptRow]:
    """Prompts from a file; errors name the file and the missing column. Rows without text are skipped;
    repeated ids keep their first row. A conversation that ends with an assistant turn (an hh-rlhf transcript,
    say) is skipped, has that turn dropped, or has it taken ``as_response`` (the initial response)."""
    return list(iter_prompts(path, column=column, id_column=id_column, response_column=response_column, split=split,
                             last_assistant_turn=last_assistant_turn, extra_columns=extra_columns))


def iter_prompts(
    path: str | Path,
    *,
    column: str = "prompt",
    id_column: str | None = None,
    response_column: str | None = None,
    split: str | None = None,
    last_assistant_turn: Literal["skip", "drop", "as_response"] = "skip",
    extra_columns: tuple[str, ...] = (),
) -> Iterator[PromptRow]:
    """:func:`load_prompts` one row at a time: JSONL, CSV and Parquet files are scanned a slice at a time, so
    only a slice and the ids seen are held, not a row object per prompt."""
    file = path if is_uri(path) else Path(path)
    frame = _scan_table(file, split=split)
    try:
        names = frame.collect_schema().names()
        if frame.head(1).collect().is_empty():
            raise ConfigError(f"{file}: prompt file has no rows")
    except (pl.exceptions.PolarsError, OSError, ValueError) as exc:
        raise ConfigError(f"{file}: cannot read prompts ({type(exc).__name__}: {exc})") from None
    wanted = [("prompt", column), ("id", id_column), ("response", response_column)]
    for what, name in [*wanted, *(("response", extra) for extra in extra_columns)]:
        if name is not None and name not in names:
            raise ConfigError(
                f"{file}: no {what} column {name!r} (columns: {', '.join(names)}); set {what}_column"
            )
    used = list(dict.fromkeys(n for n in (column, id_column, response_column, *extra_columns) if n is not None))
    seen: set[str] = set()
    for index, record in enumerate(_records(frame.select(used), file)):
        try:
            turns = parse_conversation(record[column])
        except ValueError as exc:
            raise ConfigError(f"{file}: row {index}, column {column!r}: {exc}") from None
        given = None
        if turns is not None and turns[-1]["role"] == "assistant" and last_assistant_turn != "skip":
            last = turns.pop()
            given = last["content"] if last_assistant_turn == "as_response" else None
        if not turns or turns[-1]["role"] != "user":
            continue
        row_id = str(record[id_column]) if id_column else prompt_id(turns if len(turns) > 1 else turns[0]["content"])
        if row_id in seen:
            continue
        seen.add(row_id)
        response = record[response_column] if response_column else given
        yield PromptRow(id=row_id, prompt=turns[-1]["content"], messages=tuple(turns),
                        response=str(response) if response is not None else None,
                        extra=tuple((name, record[name]) for name in extra_columns))
    if not seen:
        raise ConfigError(
            f"{file}: column {column!r} holds no usable prompt (text, or turns ending with a user turn); for "
            "conversations that end with an assistant turn, set last_assistant_turn to drop or as_response"
        )


class PromptSource(StrictModel):
    """Where a stage's prompts come from: the file (or saved dataset), its columns and how many rows."""

    input: str = ""
    prompt_column: str = "prompt"
    id_column: str | None = None
    split: str | None = None
    last_assistant_turn: Literal["skip", "drop", "as_response"] = "skip"
    """For conversations ending with an assistant turn: skip the row, drop the turn, or use it as the
    response (e.g. hh-rlhf transcripts)."""
    limit: int | None = Field(default=None, ge=1)

    def load(self, *, response_column: str | None = None, extra_columns: tuple[str, ...] = ()) -> list[PromptRow]:
        """The selected prompts (the first ``limit`` usable rows)."""
        return list(self.iter(response_column=response_column, extra_columns=extra_columns))

    def iter(self, *, response_column: str | None = None, extra_columns: tuple[str, ...] = ()) -> Iterator[PromptRow]:
        """:meth:`load` one row at a time (see :func:`iter_prompts`)."""
        rows = iter_prompts(self.input, column=self.prompt_column, id_column=self.id_column,
                            response_column=response_column, split=self.split,
                            last_assistant_turn=self.last_assistant_turn, extra_columns=extra_columns)
        return itertools.islice(rows, self.limit) if self.limit else rows
