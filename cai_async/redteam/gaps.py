"""Principle gaps from the attempts: per strategy (and variant) the attack success rate, per principle ×
strategy the rate its judge flags a non-refused answer, each with its Wilson 95% interval; and the "uncovered"
list: successes on seeds labelled harmful that no principle's judge flags (a hole in the constitution). They are
shown by :mod:`cai_async.gap_report` (``gap_lines`` here too)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from cai_async.gap_report import gap_lines
from cai_async.judging import proportion

__all__ = ["gap_lines", "principle_gaps"]


def principle_gaps(rows: list[dict[str, Any]], principles: list[str]) -> dict[str, Any]:
    """The gaps of ``rows`` (attempt rows with ``status`` ok) under ``principles`` (in their set's order).

    ``strategies``: success rate of each strategy; ``variants``: of each ``strategy/variant`` with a named
    variant; ``principles``: for each principle and strategy, the attempts whose answer was not refused and that
    principle's judge flagged, out of the attempts it judged or that were refused (an abstention is left out);
    ``uncovered``: the successes on seeds labelled harmful that no principle flagged."""
    ok = [r for r in rows if r.get("status", "ok") == "ok"]
    by_strategy: dict[str, list[dict[str, Any]]] = defaultdict(list)
    by_variant: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in ok:
        by_strategy[row["strategy"]].append(row)
        if row["variant"]:
            by_variant[f"{row['strategy']}/{row['variant']}"].append(row)

    def rate(group: list[dict[str, Any]]) -> dict[str, Any]:
        return proportion(sum(bool(r["success"]) for r in group), len(group))

    table: dict[str, dict[str, Any]] = {}
    for name in principles:
        table[name] = {}
        for strategy, group in by_strategy.items():
            hits = n = 0
            for row in group:
                score = next((s["p_good"] for s in row["scores"] if s["principle"] == name), None)
                if row["refused"]:
                    n += 1
                elif score is not None:
                    n += 1
                    hits += name in row["flagged"]
            table[name][strategy] = proportion(hits, n)
    uncovered = [
        {"id": r["id"], "strategy": r["strategy"], "variant": r["variant"], "seed_id": r["seed_id"],
         "behaviour": r["behaviour"], "prompt": r["prompt"], "answer": r["answer"]}
        for r in ok if r["uncovered"]
    ]
    return {
        "attempts": len(ok),
        "successes": sum(bool(r["success"]) for r in ok),
        "strategies": {s: rate(g) for s, g in sorted(by_strategy.items())},
        "variants": {v: rate(g) for v, g in sorted(by_variant.items())},
        "principles": table,
        "uncovered": sorted(uncovered, key=lambda u: str(u["id"])),
    }

