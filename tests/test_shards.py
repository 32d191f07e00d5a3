"""Streaming reads and compaction of Parquet shards: rows exact (order) after compaction, which keeps only each
id's latest row (the files hold no healed error rows), a compaction cut short at any step reads every row once and
finishes on the next one, exports and resume ids unchanged."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import anyio
import polars as pl
import pytest

import cai_async.store as store
from cai_async import Recipe, run_recipe
from cai_async.exports import (
    SL_COLUMNS,
    ExportConfig,
    RLExportConfig,
    dpo_frame,
    reward_frame,
    write_rl_exports,
    write_sl_exports,
)
from cai_async.runinfo import describe_run
from cai_async.stages.common import finished_ids
from cai_async.store import (
    FORMAT_KEY,
    FORMAT_VERSION,
    ShardWriter,
    compact_shards,
    iter_shards,
    read_shards,
    scan_shards,
    shard_files,
)
from tests.conftest import PUBLIC_DATA, TestServer

HH_PROMPTS = PUBLIC_DATA / "hh_rlhf" / "harmless_base_test_first_human_turns.jsonl"


def _rows(n: int, *, retried: int = 0) -> list[dict[str, Any]]:
    """``n`` rows, every 5th an error; then ``retried`` of the error rows again, now finished (a rerun)."""
    rows = [{"id": f"r{i}", "status": "error" if i % 5 == 0 else "ok", "n": i, "error_class": None,
             "error": "InvalidAnswer: no" if i % 10 == 0 else ("PermanentError: 400" if i % 5 == 0 else None)}
            for i in range(n)]
    rows += [{"id": f"r{i}", "status": "ok", "n": 1000 + i, "error_class": None, "error": None}
             for i in range(0, 5 * retried, 5)]
    return rows


def _shard_dir(tmp: Path, rows: list[dict[str, Any]], shard_rows: int = 3) -> Path:
    writer = ShardWriter(tmp / "rows", shard_rows=shard_rows)
    writer.extend(rows)
    writer.flush()
    return tmp / "rows"


def _state(directory: Path) -> tuple[pl.DataFrame, pl.DataFrame, tuple[set[str], int]]:
    return (read_shards(directory), read_shards(directory, unique_by=None),
            finished_ids(ShardWriter(directory)))


def _on_disk(directory: Path) -> pl.DataFrame:
    """Every row of the directory's Parquet files, read as a user would: plain Polars, no dedupe."""
    return pl.read_parquet(directory / "*.parquet")


def test_compaction_keeps_each_ids_latest_row_in_order(tmp_path: Path) -> None:
    directory = _shard_dir(tmp_path, _rows(40, retried=3))
    before = _state(directory)
    assert before[1].height == 43 and before[0].height == 40  # the repeats are there, and read as one
    assert _on_disk(directory).height == 43
    assert len(shard_files(directory)) == 15
    assert compact_shards(directory, target_rows=16) == 15
    files = shard_files(directory)
    assert [f.name for f in files] == ["part-00000-00004.parquet", "part-00005-00009.parquet",
                                       "part-00010-00014.parquet"]
    assert sorted(p.name for p in directory.iterdir()) == [f.name for f in files]  # nothing else left
    assert all(pl.read_parquet_metadata(f)[FORMAT_KEY] == str(FORMAT_VERSION) for f in files)
    after = _state(directory)
    assert after[0].equals(before[0]) and after[2] == before[2]
    assert after[1].equals(before[0])  # the replaced copies are gone: each id once, the latest copy, in order
    disk = _on_disk(directory)
    assert disk.height == 40 and disk["id"].n_unique() == 40
    assert disk.filter(pl.col("id").is_in(["r0", "r5", "r10"]))["n"].to_list() == [1000, 1005, 1010]  # the reruns'
    assert pl.concat(list(iter_shards(directory))).equals(before[0])  # a shard at a time
    # a rerun writes after the ranges; the next compaction folds them in with the new shards
    writer = ShardWriter(directory, shard_rows=2)
    writer.extend([{"id": "new1", "status": "ok", "n": -1}, {"id": "r1", "status": "ok", "n": -2}])
    writer.flush()
    assert [f.name for f in shard_files(directory)][-1] == "part-00015.parquet"
    grown = read_shards(directory)
    assert grown.filter(pl.col("id") == "r1")["n"].to_list() == [-2]  # the newer copy wins, as before
    compact_shards(directory, target_rows=64)
    assert [f.name for f in shard_files(directory)] == ["part-00000-00015.parquet"]
    assert read_shards(directory).equals(grown) and _on_disk(directory).equals(grown)
    # streaming reads give the same rows as the full read, in slices, with only the columns asked for
    slices = list(iter_shards(directory, columns=["id", "n", "missing"]))
    assert len(slices) == 1 and pl.concat(slices).equals(grown.select("id", "n"))
    assert pl.concat(list(iter_shards(directory, unique_by=None))).equals(read_shards(directory, unique_by=None))
    scan = scan_shards(directory, columns=["id", "missing"])
    assert scan is not None and scan.collect_schema().names() == ["id"]


class Crash(BaseException):
    """Stands in for kill -9 at one step of a compaction."""


def _crash_on(monkeypatch: pytest.MonkeyPatch, target: Any, name: str, *, after: int) -> None:
    """Make ``target.name`` raise :class:`Crash` on its call number ``after`` (the calls before run)."""
    real = getattr(target, name)
    calls = {"n": 0}

    def step(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] > after:
            raise Crash
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, step)


@pytest.mark.parametrize("step", ["before rename", "after rename", "half the deletes", "second range"])
def test_a_compaction_cut_short_loses_and_repeats_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    directory = _shard_dir(tmp_path, _rows(40, retried=3))
    before = _state(directory)
    with monkeypatch.context() as patch:
        if step == "before rename":  # the merged file is written under a hidden name, not yet renamed
            _crash_on(patch, os, "replace", after=0)
        elif step == "after rename":  # the range file is in place; none of the shards it replaces is deleted
            _crash_on(patch, Path, "unlink", after=0)
        elif step == "half the deletes":
            _crash_on(patch, Path, "unlink", after=2)
        else:  # the first range finished, the second not yet renamed
            _crash_on(patch, os, "replace", after=1)
        with pytest.raises(Crash):
            compact_shards(directory, target_rows=16)
    left = sorted(p.name for p in directory.iterdir())
    if step == "before rename":
        assert ".compact-00000-00004.tmp" in left and not any("-" in n[5:] for n in left if n.startswith("part"))
    else:
        assert "part-00000-00004.parquet" in left
    after = _state(directory)  # every id's latest row once, the same resume ids; no row but replaced ones lost
    assert after[0].equals(before[0]) and after[2] == before[2]
    assert before[0].height <= after[1].height <= before[1].height and set(after[1].rows()) <= set(before[1].rows())
    assert ShardWriter(directory)._next == 15  # a new shard never reuses a number a range covers
    compact_shards(directory, target_rows=16)  # the next compaction finishes the job and cleans up
    assert sorted(p.name for p in directory.iterdir()) == [
        "part-00000-00004.parquet", "part-00005-00009.parquet", "part-00010-00014.parquet"]
    final = _state(directory)
    assert final[0].equals(before[0]) and final[1].equals(before[0]) and final[2] == before[2]


def test_a_large_shard_left_out_of_the_runs_loses_its_replaced_rows_in_place(tmp_path: Path) -> None:
    directory = _shard_dir(tmp_path, _rows(20), shard_rows=20)  # one shard of 20 rows, 4 of them errors
    writer = ShardWriter(directory, shard_rows=2)  # a rerun heals two of them
    writer.extend([{"id": f"r{i}", "status": "ok", "n": 1000 + i, "error_class": None, "error": None} for i in (0, 5)])
    writer.flush()
    before = read_shards(directory)
    assert compact_shards(directory, target_rows=16) == 1  # the large shard rewritten; the lone small one kept
    assert [f.name for f in shard_files(directory)] == ["part-00000.parquet", "part-00001.parquet"]
    disk = _on_disk(directory)
    assert disk.height == 20 and disk["id"].n_unique() == 20 and read_shards(directory).equals(before)
    assert disk.filter(pl.col("id").is_in(["r0", "r5", "r10"]))["status"].to_list() == ["error", "ok", "ok"]
    assert compact_shards(directory, target_rows=16) == 0  # nothing left to do


def test_a_rerun_that_heals_error_rows_leaves_one_row_per_id_on_disk(tmp_path: Path, server: TestServer) -> None:
    """Two runs that fail (answers without choices: an endpoint-side error a rerun retries), then one that heals:
    the stage's files, read with plain Polars, hold each id once, the healed row; a permanent error stays."""
    prompts = tmp_path / "p.jsonl"
    lines = [*HH_PROMPTS.read_text().splitlines()[:5], '{"id": "bad", "prompt": "broken @@status:400@@"}']
    prompts.write_text("\n".join(lines) + "\n")
    recipe = Recipe.model_validate({
        "run_dir": str(tmp_path / "run"),
        "engine": {"groups": {"policy": [{"backend": "openai", "model": "m", "base_url": server.base_url}]},
                   "progress": "off", "retry": {"max_attempts": 2, "initial_s": 0.01, "max_wait_s": 0.05},
                   "breaker": {"cooloff_s": 0.05}},
        "sl": {"input": str(prompts), "id_column": "id", "num_revisions": 1, "shard_rows": 2},
    })
    sl = tmp_path / "run" / "sl"
    server.configure(nochoices=True)
    for retried in (6, 5):  # the second run retries the endpoint's errors, not the 400
        summary = anyio.run(run_recipe, recipe)
        assert summary["stages"]["sl"]["written"] == summary["stages"]["sl"]["errors"] == retried
    rows = read_shards(sl)
    assert rows.height == 6 and rows["error_class"].value_counts().sort("error_class").rows() == [
        ("InvalidAnswer", 5), ("PermanentError", 1)]
    assert read_shards(sl, unique_by=None).height == _on_disk(sl).height == 6  # 11 written: each run compacts
    server.configure(nochoices=False)
    summary = anyio.run(run_recipe, recipe)
    assert summary["stages"]["sl"]["ok"] == 5 and summary["stages"]["sl"]["errors_kept"] == 1
    disk = _on_disk(sl)
    assert disk.height == 6 and sorted(disk["id"]) == sorted(rows["id"])  # one row per id, of the 16 written
    healed = disk.filter(pl.col("id") != "bad")
    assert set(healed["status"]) == {"ok"} and healed["error"].null_count() == 5
    assert disk.filter(pl.col("id") == "bad").select("status", "error_class").row(0) == ("error", "PermanentError")
    assert disk.equals(read_shards(sl))  # what the project's readers read


def _split(run_dir: Path, into: Path) -> Path:
    """The run's chains written again as shards of two rows (as a run writes them before compaction)."""
    chains = read_shards(run_dir / "sl", unique_by=None)
    writer = ShardWriter(into, shard_rows=2)
    writer.extend(chains.to_dicts())
    writer.flush()
    return into


def _exports(run_dir: Path, chains_dir: Path) -> dict[str, pl.DataFrame]:
    write_sl_exports(run_dir, scan_shards(chains_dir, columns=SL_COLUMNS), ExportConfig())
    return {name: pl.read_parquet(run_dir / "exports" / f"{name}.parquet") for name in ("sft", "pairs")}


def test_stage_compacts_and_exports_are_unchanged(tmp_path: Path, server: TestServer) -> None:
    prompts = tmp_path / "p.jsonl"
    lines = [*HH_PROMPTS.read_text().splitlines()[:18], '{"id": "bad", "prompt": "broken @@status:400@@"}']
    prompts.write_text("\n".join(lines) + "\n")
    recipe = Recipe.model_validate({
        "run_dir": str(tmp_path / "run"),
        "engine": {"groups": {"policy": [{"backend": "openai", "model": "m", "base_url": server.base_url}]},
                   "progress": "off", "retry": {"max_attempts": 2, "initial_s": 0.01, "max_wait_s": 0.05}},
        "sl": {"input": str(prompts), "id_column": "id", "num_revisions": 2, "shard_rows": 2},
    })
    summary = anyio.run(run_recipe, recipe)
    assert summary["stages"]["sl"]["ok"] == 18 and summary["stages"]["sl"]["errors"] == 1
    run = tmp_path / "run"
    (merged,) = shard_files(run / "sl")  # ten shards of two rows, or more when flushed early: one file
    assert merged.name.startswith("part-00000-")
    assert summary["stages"]["sl"]["exports"]["sft"]["rows"] == 18
    assert summary["stages"]["sl"]["exports"]["pairs"]["rows"] == 18
    small = _split(run, tmp_path / "small" / "sl")
    assert len(shard_files(small)) == 10
    before = _exports(tmp_path / "small", small)
    ids_before = finished_ids(ShardWriter(small))
    info_before = describe_run(tmp_path / "small")["stages"]["sl"]
    compact_shards(small)
    assert len(shard_files(small)) == 1
    after = _exports(tmp_path / "small", small)
    for name in ("sft", "pairs"):
        assert after[name].equals(before[name]) and after[name].height == 18
        assert after[name].equals(pl.read_parquet(run / "exports" / f"{name}.parquet"))
    assert finished_ids(ShardWriter(small)) == ids_before and len(ids_before[0]) == 19 and ids_before[1] == 1
    assert describe_run(tmp_path / "small")["stages"]["sl"] == info_before
    assert info_before["ok"] == 18 and info_before["errors"] == 1 and info_before["rounds"] == 36
    # the streamed exports are the in-memory ones
    from cai_async.exports import pairs_frame, sft_frame

    chains = read_shards(small)
    assert sft_frame(chains).equals(before["sft"]) and pairs_frame(chains)[0].equals(before["pairs"])
    # a rerun resumes exactly from the compacted shards: nothing asked again
    calls = server.stats()["ok"]
    again = anyio.run(run_recipe, recipe)
    assert again["stages"]["sl"]["skipped_already_done"] == 19 and server.stats()["ok"] == calls
    shutil.rmtree(tmp_path / "small")


def test_rl_exports_stream_and_match_the_frames(tmp_path: Path) -> None:
    messages = [{"role": "user", "content": "q"}]
    labels = [{"id": f"p{i}", "status": "ok" if i % 4 else "error", "messages": messages, "chosen": f"c{i}",
               "rejected": f"r{i}", "confidence": [0.5, 0.7, 0.999999, 0.0001][i % 4] if i % 7 else None}
              for i in range(30)]
    directory = _shard_dir(tmp_path, labels, shard_rows=4)
    info = write_rl_exports(tmp_path, scan_shards(directory), RLExportConfig(min_confidence=0.6, max_margin=5.0))
    frame = read_shards(directory)
    dpo = pl.read_parquet(info["dpo"]["path"])
    reward = pl.read_parquet(info["reward"]["path"])
    assert dpo.equals(dpo_frame(frame, min_confidence=0.6)) and info["dpo"]["rows"] == dpo.height > 0
    assert reward.select("id", "chosen").equals(reward_frame(frame, min_confidence=0.6).select("id", "chosen"))
    import math

    for row in reward.iter_rows(named=True):
        p = next(x["confidence"] for x in labels if x["id"] == row["id"])
        assert row["margin"] == pytest.approx(min(5.0, math.log(p / (1 - p))))
    empty = write_rl_exports(tmp_path / "none", scan_shards(tmp_path / "missing"), RLExportConfig())
    assert empty["dpo"]["rows"] == 0 and pl.read_parquet(empty["reward"]["path"]).columns == [
        "id", "chosen", "rejected", "margin"]


def test_store_keeps_its_names(tmp_path: Path) -> None:
    """The names other modules (the Ray executor) write and read shards through."""
    for name in ("ShardWriter", "read_shards", "write_parquet_atomic", "scan_shards", "iter_shards",
                 "compact_shards", "shard_files", "sink_parquet_atomic"):
        assert name in store.__all__
