"""The loop report: one self-contained HTML file (``RUN_DIR/loop.html``) with, per round, held-out and fresh
attack success, XSTest safe-prompt refusals, helpfulness win rate against the starting policy and cost, each rate
with its 95% Wilson interval; held-out attack success flagged per principle; the time each step took; why the loop
stopped. The plots are PNG files beside it (``loop-*.png``) and embedded."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

__all__ = ["loop_columns", "loop_rows", "write_loop_report"]

_COLUMNS = (("heldout_asr", "held-out attack success", "lower is better", "held-out ASR"),
            ("heldout_asr_guarded", "held-out attack success behind the guard", "lower is better", "guarded h-o"),
            ("fresh_asr", "fresh attack success (this round's seeds, before its training)", "lower is better",
             "fresh ASR"),
            ("fresh_asr_guarded", "fresh attack success behind the guard", "lower is better", "guarded fresh"),
            ("xstest_refusal", "XSTest safe prompts refused (rule)", "lower is better", "XSTest refused"),
            ("helpful_win_rate", "helpfulness win rate vs the starting policy", "higher is better", "helpful win"))
_GUARDED = ("heldout_asr_guarded", "fresh_asr_guarded")


def loop_columns(rows: list[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    """The report's columns ``(key, label, hint, short label)``: the guarded ones only where a row measured them
    (a recipe with a guard section)."""
    return [c for c in _COLUMNS if c[0] not in _GUARDED or any(_value(r.get(c[0])) is not None for r in rows)]


def loop_rows(state: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per point on the loop's axis: ``start`` (the starting policy: held-out baseline, and its XSTest
    refusals as round 0's evaluation measured them) and each finished round."""
    rows: list[dict[str, Any]] = []
    baseline = state.get("baseline")
    finished = [r for r in state.get("rounds", []) if r.get("metrics") is not None]
    if baseline is not None:
        start_refusal = finished[0]["steps"]["eval"].get("xstest_refusal_start") if finished else None
        rows.append({"label": "start", "heldout_asr": baseline["asr"], "fresh_asr": None,
                     "heldout_asr_guarded": baseline.get("guarded_asr"),
                     "xstest_refusal": start_refusal, "helpful_win_rate": None,
                     "heldout_principles": baseline.get("principles", {}),
                     "cost_usd": float((baseline.get("usage") or {}).get("cost_usd") or 0), "seconds": {
                         "heldout": baseline.get("seconds", 0)}})
    for entry in finished:
        rows.append({"label": f"round {entry['round']}", **entry["metrics"]})
    return rows


def _value(entry: Any) -> float | None:
    return entry["value"] if isinstance(entry, dict) and entry.get("value") is not None else None


def _plot(series: dict[str, list[Any]], labels: list[str], *, title: str, ylabel: str, path: Path) -> Path:
    """One line per series (a rate with its interval per point of the loop's axis; None: not measured there)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    for name, entries in series.items():
        points = [(i, e) for i, e in enumerate(entries) if _value(e) is not None]
        if points:
            ax.errorbar([i for i, _ in points], [e["value"] for _, e in points], marker="o", capsize=3, label=name,
                        yerr=[[max(0.0, e["value"] - e["ci95"][0]) for _, e in points],
                              [max(0.0, e["ci95"][1] - e["value"]) for _, e in points]])
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plots(rows: list[dict[str, Any]], columns: list[tuple[str, str, str, str]], out: Path) -> list[Path]:
    labels = [r["label"] for r in rows]
    paths = [_plot({label: [r.get(key) for r in rows] for key, label, _, _ in columns}, labels,
                   title="The loop, round by round", ylabel="rate (95% Wilson interval)",
                   path=out / "loop-rates.png")]
    principles = sorted({p for r in rows for p in (r.get("heldout_principles") or {})})
    if principles:
        paths.append(_plot({p: [(r.get("heldout_principles") or {}).get(p) for r in rows] for p in principles},
                           labels, title="Held-out attacks flagged, per principle",
                           ylabel="held-out answers its judge flags", path=out / "loop-principles.png"))
    return paths


def _cell(entry: Any) -> str:
    value = _value(entry)
    if value is None:
        return "<td>–</td>"
    low, high = entry["ci95"]
    return f"<td>{value:.0%}<br><small>[{low:.0%}, {high:.0%}] n={entry['n']}</small></td>"


def write_loop_report(state: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``loop.html`` and its plots into ``out_dir``; return the HTML path."""
    out = Path(out_dir)
    rows = loop_rows(state)
    columns = loop_columns(rows)
    plots = _plots(rows, columns, out) if rows else []
    head = "".join(f"<th>{html.escape(label)}<br><small>{hint}</small></th>" for _, label, hint, _ in columns)
    body = "".join(
        f"<tr><th>{html.escape(r['label'])}</th>{''.join(_cell(r.get(k)) for k, _, _, _ in columns)}"
        f"<td>${float(r.get('cost_usd') or 0):.4f}</td>"
        f"<td>{html.escape(', '.join(f'{s} {t:.0f}s' for s, t in (r.get('seconds') or {}).items()))}</td></tr>"
        for r in rows)
    images = "".join(
        f'<figure><img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{p.name}</figcaption></figure>" for p in plots)
    little = "".join(
        f"<li>{html.escape(r['label'])}: " + html.escape(", ".join(
            f"{name} {value:.0%}" for name, value in sorted((r.get("revision_change") or {}).items())) or "-")
        + (f" — <b>changed little: {html.escape(', '.join(r['changes_little']))}</b>" if r.get("changes_little")
           else "") + "</li>"
        for r in rows if r.get("revision_change") is not None)
    stopped = state.get("stopped") or {}
    why = html.escape(str(stopped.get("reason") or "not finished: rerun `cai loop` to resume"))
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cai-async loop</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:6px 10px;text-align:left;vertical-align:top}}figure{{display:inline-block;
margin:1em}}img{{max-width:100%}}</style></head><body><h1>Red-team → CAI data → retrain, round by round</h1>
<p>Held-out attacks come from seed behaviours drawn at round 0 and never trained on; fresh attacks are each round's
new seeds against the policy the round starts from; "behind the guard" is the same attacks on the policy answering
through the recipe's guard (as <code>cai guard serve</code> would). Rates carry 95% Wilson intervals: with a few
dozen attempts they are wide, and a change inside them is not a finding.</p>
<table><tr><th></th>{head}<th>cost</th><th>time per step</th></tr>{body}</table>
<p><b>Stopped:</b> {why}</p>
<h2>How much the revisions changed the answers to the attacks that got through, per principle</h2>
<p>The mean share of the text a revision changed (1 − difflib's ratio); a principle under 10% does not move the
answers that beat the policy: its revision request is the place to look. Each round's card is in
<code>round-K/card/card.html</code>.</p><ul>{little}</ul>
{images}
</body></html>
"""
    path = out / "loop.html"
    path.write_text(page, encoding="utf-8")
    return path
