"""The principle gaps of a red-team run (``RUN_DIR/redteam/gaps.json``, written by the redteam stage) as plain
lines, Markdown and HTML: one rendering, shared by ``cai redteam``, the constitution card and the evaluation
report. It lives on the bottom floor because those three stand side by side and import none of each other."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from backends.atomic import read_json

__all__ = ["GAPS_FILE", "gap_lines", "gaps_html", "gaps_markdown", "rate_text", "read_gaps", "shown_gaps"]

GAPS_FILE = Path("redteam") / "gaps.json"
"""Where the redteam stage writes the gaps, under the run directory."""

_UNCOVERED = "uncovered (harmful seed, attack succeeded, no principle flags it)"


def read_gaps(run_dir: str | Path) -> dict[str, Any] | None:
    """The gaps of the run in ``run_dir`` (None: it was never red-teamed)."""
    path = Path(run_dir) / GAPS_FILE
    if not path.is_file():
        return None
    gaps: dict[str, Any] = read_json(path)
    return gaps


def shown_gaps(gaps: dict[str, Any], *, examples: int = 5) -> dict[str, Any]:
    """``gaps`` with only the first ``examples`` uncovered successes kept (``uncovered_count``: how many there
    are), as a card or report shows them."""
    uncovered = gaps["uncovered"]
    return {**gaps, "uncovered": uncovered[:examples], "uncovered_count": gaps.get("uncovered_count",
                                                                                   len(uncovered))}


def rate_text(entry: dict[str, Any] | None) -> str:
    """A rate with its Wilson interval and n, in a line ("-" when there is none)."""
    if not entry or entry.get("value") is None:
        return "-"
    low, high = entry["ci95"]
    return f"{entry['value']:.0%} [{low:.0%}, {high:.0%}] n={entry['n']}"


def _rows(gaps: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Each strategy's success, its named variants below it."""
    rows = []
    for strategy, entry in gaps["strategies"].items():
        rows.append((strategy, entry))
        rows += [(variant, e) for variant, e in gaps["variants"].items() if variant.startswith(f"{strategy}/")]
    return rows


def _uncovered(gaps: dict[str, Any], examples: int) -> tuple[int, list[tuple[str, str, str, str]]]:
    """How many uncovered successes, and the first ``examples`` as (attack, seed, behaviour, answer)."""
    items = gaps["uncovered"]
    return gaps.get("uncovered_count", len(items)), [
        (f"{u['strategy']}{'/' + u['variant'] if u['variant'] else ''}", str(u["seed_id"]), u["behaviour"],
         u["answer"]) for u in items[:examples]]


def gap_lines(gaps: dict[str, Any], *, examples: int = 5) -> list[str]:
    """The gaps as plain lines: success per strategy (and variant), the principle × strategy table, and the
    first uncovered successes."""
    lines = [f"{gaps['successes']} successful attacks of {gaps['attempts']} attempts"]
    lines += [f"  {'  ' if '/' in name else ''}{name}: {rate_text(entry)}" for name, entry in _rows(gaps)]
    strategies = list(gaps["strategies"])
    if gaps["principles"] and strategies:
        lines.append("flagged by principle (not refused and the principle's judge flags it):")
        for principle, row in gaps["principles"].items():
            cells = ", ".join(f"{s} {row[s]['value']:.0%}" for s in strategies if row[s]["value"] is not None)
            lines.append(f"  {principle}: {cells or '-'}")
    count, items = _uncovered(gaps, examples)
    lines.append(f"{_UNCOVERED}: {count}")
    lines += [f"  {attack} {seed}: {behaviour[:80]!r} → {answer[:80]!r}" for attack, seed, behaviour, answer in items]
    return lines


_INTRO = ("Per strategy, the share of attempts that succeeded (the target did not refuse, and a principle's judge "
          "flagged the answer or the seed is labelled harmful), with its 95% Wilson interval. Per principle × "
          "strategy, the share of attempts whose answer that principle's judge flagged.")


def gaps_markdown(gaps: dict[str, Any], *, examples: int = 5, heading: str = "##") -> str:
    """The gaps as a Markdown section headed ``Red-team gaps``."""
    lines = [f"{heading} Red-team gaps", "", f"{gaps['successes']} successful attacks of {gaps['attempts']} "
             f"attempts. {_INTRO}", "", "| attack | success | 95% interval | attempts |", "|---|---|---|---|"]
    for name, entry in _rows(gaps):
        value = "–" if entry["value"] is None else f"{entry['value']:.1%}"
        low, high = entry["ci95"]
        lines.append(f"| {name} | {value} | {low:.1%}–{high:.1%} | {entry['n']} |")
    strategies = list(gaps["strategies"])
    if gaps["principles"] and strategies:
        lines += ["", "Flagged by principle:", "", "| principle | " + " | ".join(strategies) + " |",
                  "|---" * (len(strategies) + 1) + "|"]
        for principle, row in gaps["principles"].items():
            cells = " | ".join(_short(row[s]) for s in strategies)
            lines.append(f"| {principle.replace('|', chr(92) + '|')} | {cells} |")
    count, items = _uncovered(gaps, examples)
    lines += ["", f"{_UNCOVERED[0].upper()}{_UNCOVERED[1:]}: {count}" + (f"; the first {len(items)}:"
                                                                         if items else ".")]
    if items:
        lines.append("")
        lines += [f"- {attack} {seed}: {behaviour[:120]!r} → {answer[:120]!r}"
                  for attack, seed, behaviour, answer in items]
    return "\n".join(lines) + "\n"


def _short(entry: dict[str, Any]) -> str:
    if entry["value"] is None:
        return "–"
    low, high = entry["ci95"]
    return f"{entry['value']:.1%} ({low:.0%}–{high:.0%}, n={entry['n']})"


def gaps_html(gaps: dict[str, Any], *, examples: int = 5, heading: str = "h2") -> str:
    """The gaps as an HTML section headed ``Red-team gaps`` (no scripts, no external resources)."""
    e = html.escape
    sub = f"h{int(heading[1:]) + 1}"
    parts = [f"<{heading}>Red-team gaps</{heading}><p>{gaps['successes']} successful attacks of "
             f"{gaps['attempts']} attempts. {e(_INTRO)}</p><table><tr><th>attack</th><th>success</th>"
             "<th>95% interval</th><th>attempts</th></tr>"]
    for name, entry in _rows(gaps):
        value = "–" if entry["value"] is None else f"{entry['value']:.1%}"
        low, high = entry["ci95"]
        indent = "&nbsp;&nbsp;" if "/" in name else ""
        parts.append(f"<tr><td>{indent}{e(name)}</td><td>{value}</td><td>{low:.1%}–{high:.1%}</td>"
                     f"<td>{entry['n']}</td></tr>")
    parts.append("</table>")
    strategies = list(gaps["strategies"])
    if gaps["principles"] and strategies:
        parts.append(f"<{sub}>Flagged by principle</{sub}><table><tr><th>principle</th>"
                     + "".join(f"<th>{e(s)}</th>" for s in strategies) + "</tr>")
        parts += [f"<tr><td>{e(principle)}</td>" + "".join(f"<td>{e(_short(row[s]))}</td>" for s in strategies)
                  + "</tr>" for principle, row in gaps["principles"].items()]
        parts.append("</table>")
    count, items = _uncovered(gaps, examples)
    parts.append(f"<{sub}>Uncovered: {count}</{sub}><p>Successes on seeds labelled harmful that no principle's "
                 f"judge flags: holes in the constitution{f'; the first {len(items)}' if items else ''}.</p>")
    if items:
        parts.append("<ol>" + "".join(f"<li><b>{e(attack)}</b> {e(seed)}: {e(behaviour[:300])}<br><small>→ "
                                      f"{e(answer[:300])}</small></li>" for attack, seed, behaviour, answer in items)
                     + "</ol>")
    return "".join(parts)
