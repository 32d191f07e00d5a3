"""What a run directory holds: counts, cost, failure reasons, and chains as readable text (``cai show``)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl

from backends.errors import ConfigError
from cai_async.engine.ledger import read_ledger
from cai_async.store import iter_shards, read_json, scan_shards, shard_columns

__all__ = ["chain_text", "describe_run", "sample_chains"]


def _reason(error: str) -> str:
    """An error message with row-specific details (numbers, quoted text) blurred, so equal causes group."""
    return re.sub(r"'[^']*'|\"[^\"]*\"|\d+(?:\.\d+)?", "…", error)[:200]


def describe_run(run_dir: str | Path) -> dict[str, Any]:
    """Counts per stage, tokens and cost, grouped failure reasons and exports of a run directory."""
    root = Path(run_dir)
    if not root.is_dir():
        raise ConfigError(f"{root}: no such run directory")
    info: dict[str, Any] = {"run_dir": str(root), "stages": {}}
    summary_path = root / "summary.json"
    ledger = read_ledger(root)  # read live: every process that worked on the run, killed ones too
    if ledger is not None:
        info.update(calls=ledger["calls"], cache_hits=ledger["cache_hits"], tokens=ledger["tokens"],
                    cost_usd=ledger["cost_usd"], processes=ledger["processes"])
        info["unfinished_processes"] = ledger["unfinished"]
        cache = root / "cache.sqlite"
        if cache.is_file():
            from cai_async.engine.cache import RequestCache

            stored = RequestCache(cache)
            info["calls_paid_twice"] = max(0, ledger["calls"] - len(stored))  # answered, then lost to a kill
            stored.close()
    if summary_path.is_file():
        summary = read_json(summary_path)
        engine = summary.get("engine", {})
        if ledger is None:
            info["tokens"] = engine.get("tokens", 0)
            info["cost_usd"] = engine.get("cost_usd", 0.0)
            info["calls"] = sum(e.get("calls", 0) for e in engine.get("endpoints", {}).values())
            info["cache_hits"] = engine.get("cache_hits", 0)
        if summary.get("stopped"):
            info["stopped"] = summary["stopped"]
        if engine.get("local"):  # in-process models: threads, batching, the decode loop's counters
            info["local_models"] = engine["local"]
        if "plan" in summary:
            plan = summary["plan"]
            info["estimate_vs_actual"] = {
                "calls": [plan["calls"], info["calls"] + info["cache_hits"]],
                "tokens": [plan["input_tokens"] + plan["output_tokens"], info["tokens"]],
                "cost_usd": [plan["cost_usd"], info["cost_usd"]],
            }
        info["unrecorded_failures"] = {
            name: stage.get("failed", 0) for name, stage in summary.get("stages", {}).items()
        }
    journals = sorted((root / "batches").glob("*/journal.sqlite"))
    if journals:  # read live, so a crashed run shows the batches it left in flight
        from backends.batch_journal import BatchJournal

        info["batches"] = {}
        for path in journals:
            journal = BatchJournal(path.parent)
            info["batches"][path.parent.name] = journal.summary()
            journal.close()
    for stage in ("generate", "sl", "helpful", "rl/pairs", "rl/labels"):
        stats = _stage_stats(root / stage, stage)
        if stats is not None:
            info["stages"][stage] = stats
    exports = root / "exports"
    if exports.is_dir():
        info["exports"] = {p.name: pl.scan_parquet(p).select(pl.len()).collect().item()
                           for p in sorted(exports.glob("*.parquet"))}
    return info


_STAT_COLUMNS = ("status", "error", "error_step", "rounds", "stopped_early", "constitution_hash", "abstained",
                 "confidence", "consistency", "methods")


def _stage_stats(directory: Path, stage: str) -> dict[str, Any] | None:
    """A stage's counts, failure reasons and per-round or per-label statistics, read a slice at a time with
    only the columns they need (memory stays flat in the rows)."""
    names = set(shard_columns(directory))
    if not names:
        return None
    rows = ok = rounds_total = cleaned = stopped = abstained = 0
    reasons: Counter[str] = Counter()
    principles: Counter[str] = Counter()
    hashes: set[str] = set()
    methods: set[str] = set()
    sums: dict[str, list[float]] = {"confidence": [0.0, 0], "consistency": [0.0, 0]}
    for frame in iter_shards(directory, columns=["id", *[c for c in _STAT_COLUMNS if c in names]]):
        rows += frame.height
        if "status" not in names:
            continue
        good = frame.filter(pl.col("status") == "ok")
        ok += good.height
        for row in frame.filter(pl.col("status") != "ok").select(
                *[c for c in ("error_step", "error") if c in names]).iter_rows(named=True):
            reasons[f"{row.get('error_step') or stage}: {_reason(row.get('error') or '')}"] += 1
        if "rounds" in names:
            steps = frame.select(pl.col("rounds").explode()).unnest("rounds").drop_nulls("round")
            rounds_total += steps.height
            cleaned += int(steps["cleaned"].sum() or 0)
            stopped += int(frame["stopped_early"].sum() or 0)
            principles.update(steps["principle"].to_list())
            hashes.update(frame["constitution_hash"].to_list())
        if "judgments" in names:
            abstained += int(good["abstained"].sum() or 0)
            for key, acc in sums.items():
                values = good[key].drop_nulls()
                acc[0] += float(values.sum() or 0.0)
                acc[1] += values.len()
            methods.update(m for value in good["methods"].to_list() for m in (value or "").split(",") if m)
    stats: dict[str, Any] = {"rows": rows}
    if "status" in names:
        stats.update(ok=ok, errors=rows - ok, failure_reasons=dict(reasons.most_common(10)))
    if "rounds" in names:
        stats.update(rounds=rounds_total, revisions_cleaned=cleaned, stopped_early=stopped,
                     principles=dict(principles.most_common()), constitution_hashes=sorted(hashes))
    if "judgments" in names:
        stats["abstained"] = abstained
        for name, (total, count) in (("mean_confidence", sums["confidence"]),
                                     ("position_consistency", sums["consistency"])):
            stats[name] = round(total / count, 4) if count else None
        stats["methods"] = sorted(methods)
    return stats


def sample_chains(run_dir: str | Path, count: int, *, errors: bool = False) -> list[dict[str, Any]]:
    """The first ``count`` finished chains of a run (failed ones with ``errors``), read lazily: the scan stops
    early and holds no more than it shows."""
    scan = scan_shards(Path(run_dir) / "sl")
    if scan is None or count <= 0:
        return []
    picked = scan.filter((pl.col("status") != "ok") if errors else (pl.col("status") == "ok"))
    return picked.head(count).collect(engine="streaming").to_dicts()


def chain_text(row: dict[str, Any], *, width: int = 400) -> str:
    """One chain row as readable text: the conversation, the initial response, then each round."""

    def cut(text: str | None) -> str:
        text = (text or "").strip()
        return text if len(text) <= width else text[: width - 1] + "…"

    lines = [f"── chain {row['id']} ({row['status']}, constitution {row['constitution']})"]
    for message in row["messages"]:
        lines.append(f"{message['role'].upper()}: {cut(message['content'])}")
    lines.append(f"INITIAL ({row['initial_source']}): {cut(row['initial_response'])}")
    for step in row["rounds"] or []:
        lines.append(f"  round {step['round']} · principle {step['principle']}")
        lines.append(f"    CRITIQUE: {cut(step['critique'])}")
        if step["early_stop"]:
            lines.append("    (stopped early: the critique found nothing to fix)")
        elif step["revision"] is not None:
            flag = " [wrapper text removed]" if step["cleaned"] else ""
            lines.append(f"    REVISION{flag}: {cut(step['revision'])}")
    if row["status"] != "ok":
        lines.append(f"ERROR at {row['error_step']}: {row['error']}")
    return "\n".join(lines)
