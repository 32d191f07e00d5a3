"""Principle gaps from the attempts: per strategy (and variant) the attack success rate, per principle ×
strategy the rate its judge flags a non-refused answer, each with its Wilson 95% interval; and the "uncovered"
list: successes on seeds labelled harmful that no principle's judge flags (a hole in the constitution)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

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


def _pct(entry: dict[str, Any]) -> str:
    if entry["value"] is None:
        return "-"
    low, high = entry["ci95"]
    return f"{entry['value']:.0%} [{low:.0%}, {high:.0%}] n={entry['n']}"


def gap_lines(gaps: dict[str, Any], *, examples: int = 5) -> list[str]:
    """The gaps as plain lines: success per strategy (and variant), the principle × strategy table, and the
    first uncovered successes."""
    lines = [f"{gaps['successes']} successful attacks of {gaps['attempts']} attempts"]
    for strategy, entry in gaps["strategies"].items():
        lines.append(f"  {strategy}: {_pct(entry)}")
        lines += [f"    {v}: {_pct(e)}" for v, e in gaps["variants"].items() if v.startswith(f"{strategy}/")]
    strategies = list(gaps["strategies"])
    if gaps["principles"] and strategies:
        lines.append("flagged by principle (not refused and the principle's judge flags it):")
        for principle, row in gaps["principles"].items():
            cells = ", ".join(f"{s} {row[s]['value']:.0%}" for s in strategies if row[s]["value"] is not None)
            lines.append(f"  {principle}: {cells or '-'}")
    uncovered = gaps["uncovered"]
    lines.append(f"uncovered (harmful seed, attack succeeded, no principle flags it): {len(uncovered)}")
    for item in uncovered[:examples]:
        lines.append(f"  {item['strategy']}{'/' + item['variant'] if item['variant'] else ''} "
                     f"{item['seed_id']}: {item['behaviour'][:80]!r} → {item['answer'][:80]!r}")
    return lines
