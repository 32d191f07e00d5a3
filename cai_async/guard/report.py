"""``cai guard report``: what the guard decided in a run — verdicts by direction, decision and tier, latency
percentiles, and how often each principle was violated."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from backends.errors import ConfigError
from cai_async.store import read_shards

__all__ = ["guard_report"]


def guard_report(run_dir: str | Path) -> dict[str, Any]:
    """Summary of ``RUN_DIR/guard/verdicts``."""
    verdicts = read_shards(Path(run_dir) / "guard" / "verdicts")
    if verdicts.is_empty():
        raise ConfigError(f"{run_dir}: no guard verdicts here (run `cai guard serve` with this run directory)")
    report: dict[str, Any] = {"verdicts": verdicts.height, "directions": {}}
    for (direction,), part in verdicts.group_by(["direction"], maintain_order=True):
        latency = part["latency_s"]
        violated = part.select(pl.col("violated").explode()).drop_nulls()["violated"].value_counts(sort=True)
        report["directions"][str(direction)] = {
            "count": part.height,
            "decisions": dict(part["decision"].value_counts(sort=True).iter_rows()),
            "tiers": dict(part["tier"].value_counts(sort=True).iter_rows()),
            "latency_p50_s": latency.quantile(0.5), "latency_p99_s": latency.quantile(0.99),
            "judge_calls": int(part["judge_calls"].sum()),
            "violations": dict(violated.iter_rows()),
            "errors": part.filter(pl.col("error").is_not_null()).height,
        }
    return report
