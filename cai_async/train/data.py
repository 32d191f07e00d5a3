"""Training data: the exports, checked for the columns each trainer needs and for rows longer than
``max_length`` (counted and reported before training; a clear error when none would be left)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from backends.errors import ConfigError

__all__ = ["REQUIRED_COLUMNS", "load_training_data", "sequence_lengths"]

REQUIRED_COLUMNS = {
    "sft": ("messages",),
    "reward": ("chosen", "rejected"),
    "dpo": ("prompt", "chosen", "rejected"),
    "soft_dpo": ("prompt", "chosen", "rejected", "confidence"),
    "rl": ("prompt",),
}


def load_training_data(path: str | Path, kind: str) -> Any:
    """A ``datasets.Dataset`` from a Parquet export, with the columns ``kind`` needs."""
    import datasets

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{file}: no training data here; run the stage that exports it first, or set the path")
    try:
        dataset = datasets.load_dataset("parquet", data_files=str(file), split="train")
    except Exception as exc:  # datasets raises many types for unreadable files
        raise ConfigError(f"{file}: cannot read as Parquet ({type(exc).__name__}: {exc})") from None
    missing = [c for c in REQUIRED_COLUMNS[kind] if c not in dataset.column_names]
    if missing:
        raise ConfigError(
            f"{file}: {kind} training needs the columns {', '.join(REQUIRED_COLUMNS[kind])}; missing "
            f"{', '.join(missing)} (has {', '.join(dataset.column_names)})"
        )
    if len(dataset) == 0:
        raise ConfigError(f"{file}: no rows to train on")
    return dataset


def sequence_lengths(dataset: Any, tokenizer: Any, columns: tuple[str, ...]) -> list[int]:
    """Longest tokenized length per row over ``columns`` (conversations rendered with the chat template)."""
    lengths = []
    for row in dataset:
        longest = 0
        for column in columns:
            messages = list(row[column])
            if column in ("chosen", "rejected") and "prompt" in row and row["prompt"]:
                messages = [*row["prompt"], *messages]
            ids = tokenizer.apply_chat_template(messages, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            longest = max(longest, len(ids))
        lengths.append(longest)
    return lengths
