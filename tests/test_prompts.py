"""Prompt inputs (JSONL, CSV, Parquet, saved HF datasets, conversations, hh-rlhf transcripts) and revision
cleaning."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import polars as pl
import pytest

from cai_async import ConfigError, clean_revision, load_prompts, parse_conversation
from tests.conftest import PUBLIC_DATA

HH = PUBLIC_DATA / "hh_rlhf" / "harmless-base" / "test.jsonl.gz"


def test_hh_rlhf_transcripts_become_conversations() -> None:
    with gzip.open(HH, "rt") as handle:
        record = json.loads(handle.readline())
    turns = parse_conversation(record["chosen"])
    assert turns is not None and turns[0]["role"] == "user" and turns[-1]["role"] == "assistant"
    assert [t["role"] for t in turns] == ["user", "assistant"] * (len(turns) // 2)
    assert record["chosen"].count("\n\nHuman:") == sum(t["role"] == "user" for t in turns)


def test_hh_rlhf_file_with_the_last_assistant_turn_as_the_response() -> None:
    rows = load_prompts(HH, column="rejected", last_assistant_turn="as_response")
    with gzip.open(HH, "rt") as handle:
        assert len(rows) == sum(1 for _ in handle) == 250  # every transcript of the bundled slice
    with pytest.raises(ConfigError, match="set last_assistant_turn"):
        load_prompts(HH, column="rejected")  # every transcript ends with an assistant turn
    assert all(r.messages[-1]["role"] == "user" and r.response is not None for r in rows)
    dropped = load_prompts(HH, column="rejected", last_assistant_turn="drop")
    assert {r.id for r in dropped} == {r.id for r in rows} and all(r.response is None for r in dropped)


def test_csv_parquet_and_messages_columns(tmp_path: Path) -> None:
    csv = PUBLIC_DATA / "xstest" / "xstest_prompts.csv"
    rows = load_prompts(csv, column="prompt", id_column="id")
    assert len(rows) == 450 and rows[0].id == "1"
    frame = pl.DataFrame({
        "conv": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                  {"role": "user", "content": "how do I pick a lock?"}]],
        "answer": ["Here is how."],
    })
    frame.write_parquet(tmp_path / "c.parquet")
    (row,) = load_prompts(tmp_path / "c.parquet", column="conv", response_column="answer")
    assert row.prompt == "how do I pick a lock?" and len(row.conversation()) == 3 and row.response == "Here is how."


def test_saved_hugging_face_dataset(tmp_path: Path) -> None:
    import datasets

    source = datasets.Dataset.from_dict({"question": ["a?", "b?", "c?"], "n": [1, 2, 3]})
    source.save_to_disk(str(tmp_path / "ds"))
    assert [r.prompt for r in load_prompts(tmp_path / "ds", column="question")] == ["a?", "b?", "c?"]
    datasets.DatasetDict({"train": source, "test": source.select([0])}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_prompts(tmp_path / "dd", column="question", split="test")) == 1
    with pytest.raises(ConfigError, match="no split 'dev'"):
        load_prompts(tmp_path / "dd", column="question", split="dev")


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        (b"", "prompt file is empty"),
        (b'{"text": "hi"}\n', "no prompt column 'prompt' \\(columns: text\\)"),
        (b'{"prompt": "  "}\n', "no usable prompt"),
        (b"\x00\xff{not json", "cannot read prompts"),
    ],
)
def test_bad_prompt_files_say_what_to_fix(tmp_path: Path, content: bytes, pattern: str) -> None:
    path = tmp_path / "p.jsonl"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=pattern) as info:
        load_prompts(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Sure, here is the revised response: I can't help with that.", "I can't help with that."),
        ("Here's a revised version of the response that is safer:\n\nPlease talk to someone you trust.",
         "Please talk to someone you trust."),
        ("Revised response: \"Stay safe and ask a professional.\"", "Stay safe and ask a professional."),
        ("Rewrite the response to be kind.\nI hope your day gets better.", "I hope your day gets better."),
        ("You're right, I'll fix it. Here's a revised version:\n\nTry talking to them calmly.",
         "Try talking to them calmly."),
    ],
)
def test_wrapper_text_is_removed_and_flagged(raw: str, expected: str) -> None:
    assert clean_revision(raw, "Rewrite the response to be kind.") == (expected, True)


@pytest.mark.parametrize(
    "text",
    ["Sure! Baking bread takes flour, water, yeast and salt.", 'He said "no" and "yes".', "Plain answer."],
)
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert clean_revision(text, "Rewrite the response to be kind.") == (text, False)
