"""``cai guard report``: what the guard decided in a run — verdicts by direction, decision and tier, latency
percentiles, how often each principle was violated (:func:`principle_verdicts`, which the constitution
card shows too) and, when the classifier was audited, how its calls compare with the judge's."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polars as pl

from backends.errors import ConfigError
from cai_async.guard.audit import audit_summary
from cai_async.guard.verdicts import read_verdicts

__all__ = ["guard_report", "principle_verdicts", "read_verdicts"]

_OTHER = "\x00other"
"""The key principles outside ``names`` are pooled under (no principle can be named so)."""


def _counts(frame: pl.DataFrame, column: str) -> dict[str, dict[str, int]]:
    """Per principle key, how many of its verdicts had each value of ``column`` (most first)."""
    out: dict[str, dict[str, int]] = {}
    grouped = frame.group_by(["key", column]).len().sort(["key", "len", column], descending=[False, True, False])
    for key, value, count in grouped.iter_rows():
        out.setdefault(key, {})[str(value)] = count
    return out


def _empty() -> dict[str, Any]:
    return {"checked": 0, "violated": 0, "directions": {"input": 0, "output": 0}, "decisions": {}, "tiers": {},
            "score_mean": None, "score_max": None}


def principle_verdicts(verdicts: pl.DataFrame, *, names: Sequence[str] | None = None) -> dict[str, Any]:
    """Per principle, from verdict rows: ``checked`` (verdicts that scored it), ``violated`` (verdicts that found
    it violated) split by ``directions``, ``decisions`` (block/revise/flag) and deciding ``tiers``, and the
    ``score_mean``/``score_max`` of its scores. Returns ``{"principles": {name: ...}, "other": ... | None}``.
    Without ``names`` every principle seen is listed (most violated first); with them, exactly those, in that
    order (0 where never seen), and any other principle a verdict names is pooled under ``other`` (its
    ``names`` listed), so nothing is dropped."""
    keep = list(names) if names is not None else None

    def keyed(frame: pl.DataFrame) -> pl.DataFrame:
        if keep is None:
            return frame.with_columns(key=pl.col("name"))
        return frame.with_columns(key=pl.when(pl.col("name").is_in(keep)).then(pl.col("name"))
                                  .otherwise(pl.lit(_OTHER)))

    rows = verdicts.with_row_index("row")
    hits = keyed(rows.select("row", "direction", "decision", "tier", pl.col("violated").alias("name"))
                 .explode("name").drop_nulls("name")).unique(["row", "key"])
    scored = keyed(rows.select("row", "scores").explode("scores").drop_nulls("scores").unnest("scores"))
    stats: dict[str, dict[str, Any]] = {}
    for key, violated in hits.group_by("key").len().sort(["len", "key"], descending=[True, False]).iter_rows():
        stats.setdefault(key, _empty())["violated"] = violated
    per_key = scored.group_by("key").agg(pl.col("row").n_unique(), pl.col("score").mean().alias("mean"),
                                         pl.col("score").max().alias("max"))
    for key, checked, mean, top in per_key.sort("key").iter_rows():
        stats.setdefault(key, _empty()).update(checked=checked, score_mean=mean, score_max=top)
    for column, field in (("direction", "directions"), ("decision", "decisions"), ("tier", "tiers")):
        for key, counts in _counts(hits, column).items():
            stats[key][field].update(counts)
    other = stats.pop(_OTHER, None)
    if other is not None:
        seen = pl.concat([hits.select("key", "name"), scored.select("key", "name")])
        other["names"] = sorted(seen.filter(pl.col("key") == _OTHER)["name"].unique().to_list())
    principles = stats if keep is None else {name: stats.get(name, _empty()) for name in keep}
    return {"principles": principles, "other": other}


def guard_report(run_dir: str | Path) -> dict[str, Any]:
    """Summary of ``RUN_DIR/guard/verdicts``."""
    verdicts = read_verdicts(run_dir)
    if verdicts.is_empty():
        raise ConfigError(f"{run_dir}: no guard verdicts here (run `cai guard serve` with this run directory)")
    report: dict[str, Any] = {"verdicts": verdicts.height, "directions": {}}
    for (direction,), part in verdicts.group_by(["direction"], maintain_order=True):
        latency = part["latency_s"]
        violated = principle_verdicts(part)["principles"]
        report["directions"][str(direction)] = {
            "count": part.height,
            "decisions": dict(part["decision"].value_counts(sort=True).iter_rows()),
            "tiers": dict(part["tier"].value_counts(sort=True).iter_rows()),
            "latency_p50_s": latency.quantile(0.5), "latency_p99_s": latency.quantile(0.99),
            "judge_calls": int(part["judge_calls"].sum()),
            "violations": {name: s["violated"] for name, s in violated.items() if s["violated"]},
            "errors": part.filter(pl.col("error").is_not_null()).height,
        }
    report["principles"] = principle_verdicts(verdicts)["principles"]
    audit = audit_summary(verdicts)
    if audit is not None:
        report["audit"] = audit  # the classifier against the judge on the audited checks
    return report
