"""The evaluation report: a self-contained HTML file (headline table with 95% intervals, the plots embedded,
the run's red-team gaps when it was red-teamed, example answers per suite, failures) and the plots as PNG files
beside it. No scripts, no external assets."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import polars as pl

from cai_async.gap_report import gaps_html

__all__ = ["METRICS", "write_report"]

METRICS = {
    "harmful_rate": ("Harmful answers to red-team prompts", "lower is better"),
    "jailbreak_success": ("Jailbreak attack success", "lower is better"),
    "overrefusal_rule": ("Refusals of safe XSTest prompts (rule)", "lower is better"),
    "overrefusal_judge": ("Refusals of safe XSTest prompts (judge)", "lower is better"),
    "unsafe_compliance_rule": ("Compliance with unsafe XSTest prompts (rule)", "lower is better"),
    "refusal_rule_judge_agreement": ("Rule vs judge refusal agreement", "higher means the two agree"),
    "helpful_win_rate": ("Helpfulness win rate vs baseline (judge)", "higher is better"),
}


def _spread(entry: dict[str, Any]) -> list[list[float]]:
    """Error-bar lengths below and above a rate (never negative, whatever the rounding)."""
    low, high = entry["ci95"]
    return [[max(0.0, entry["value"] - low)], [max(0.0, high - entry["value"])]]


def _plots(metrics: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(metrics["models"])
    keys = [k for k in METRICS if any(isinstance(metrics["models"][m].get(k), dict)
                                      and metrics["models"][m][k]["value"] is not None for m in models)]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(keys) + 2), 4))
    width = 0.8 / max(1, len(models))
    for index, model in enumerate(models):
        values, lows, highs = [], [], []
        for key in keys:
            entry = metrics["models"][model].get(key) or {"value": None, "ci95": [0, 0]}
            value = entry["value"] if entry["value"] is not None else 0.0
            values.append(value)
            lows.append(max(0.0, value - entry["ci95"][0]))
            highs.append(max(0.0, entry["ci95"][1] - value))
        xs = [i + index * width for i in range(len(keys))]
        ax.bar(xs, values, width, yerr=[lows, highs], capsize=3, label=model)
    ax.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(keys))])
    ax.set_xticklabels([k.replace("_", "\n") for k in keys], fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("rate (95% Wilson interval)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    bars = out / "metrics.png"
    fig.savefig(bars, dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 5))
    for model in models:
        harm = metrics["models"][model].get("harmful_rate") or {}
        refuse = metrics["models"][model].get("overrefusal_rule") or {}
        if harm.get("value") is not None and refuse.get("value") is not None:
            ax.errorbar(refuse["value"], harm["value"], fmt="o", capsize=3, xerr=_spread(refuse), yerr=_spread(harm))
            ax.annotate(model, (refuse["value"], harm["value"]), textcoords="offset points", xytext=(6, 6))
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("over-refusal (safe XSTest prompts refused)")
    ax.set_ylabel("harmful answers (red-team prompts)")
    ax.set_title("Harmlessness vs over-refusal (bottom-left is best)")
    fig.tight_layout()
    scatter = out / "tradeoff.png"
    fig.savefig(scatter, dpi=100)
    plt.close(fig)
    return [bars, scatter]


def _cell(entry: Any) -> str:
    if not isinstance(entry, dict) or entry.get("value") is None:
        return "<td>–</td>"
    low, high = entry["ci95"]
    return f"<td>{entry['value']:.1%}<br><small>{low:.0%}–{high:.0%} · n={entry['n']}</small></td>"


def _guard_table(guard: dict[str, Any]) -> str:
    """The guard alone on XSTest and AdvBench: each tier's precision, recall and false-positive rate, and how
    much traffic the cascade sent to the judge."""
    if not guard:
        return ""
    columns = [("precision", "precision"), ("recall", "recall"), ("fpr", "false positives"),
               ("xstest_safe_flagged", "XSTest safe flagged"), ("xstest_unsafe_recall", "XSTest unsafe caught"),
               ("advbench_recall", "AdvBench caught")]
    head = "".join(f"<th>{label}</th>" for _, label in columns)
    rows = "".join(f"<tr><th>{html.escape(tier)}</th>{''.join(_cell(entry.get(key)) for key, _ in columns)}</tr>"
                   for tier, entry in guard["tiers"].items())
    cascade = guard["cascade"]
    share = cascade["judge_share"]
    delta = cascade["recall_minus_judge_alone"]
    return (f"<h2>The guard alone (input checks)</h2><p>Each tier asked on its own (the classifier at its calibrated "
            f"block threshold), and the cascade. The cascade asked the judge on {share['value']:.1%} of "
            f"{share['n']} prompts; its recall minus the judge's alone: "
            f"{'–' if delta is None else f'{delta:+.1%}'}; decided by: "
            f"{html.escape(', '.join(f'{k} {v}' for k, v in cascade['decided_by'].items()))}.</p>"
            f"<table><tr><th>tier</th>{head}</tr>{rows}</table>")


def write_report(metrics: dict[str, Any], samples: pl.DataFrame, out_dir: str | Path, *,
                 examples: int = 2, gaps: dict[str, Any] | None = None) -> Path:
    """Write ``report.html``, ``metrics.png`` and ``tradeoff.png`` into ``out_dir``; return the HTML path.
    ``gaps``: the run's red-team gaps (``redteam/gaps.json``), shown after the plots."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(metrics, out)
    models = list(metrics["models"])
    compare = metrics.get("compare") or {}
    head = "".join(f"<th>{html.escape(m)}</th>" for m in models) + ("<th>Δ after − before</th>" if compare else "")
    rows = []
    for key, (label, hint) in METRICS.items():
        cells = "".join(_cell(metrics["models"][m].get(key)) for m in models)
        if compare:
            delta = compare.get(key)
            better = delta is not None and ((delta < 0) == (hint == "lower is better")) and delta != 0
            style = "good" if better else ("bad" if delta else "")
            cells += f'<td class="{style}">{"–" if delta is None else f"{delta:+.1%}"}</td>'
        rows.append(f"<tr><th>{html.escape(label)}<br><small>{hint}</small></th>{cells}</tr>")
    images = "".join(
        f'<figure><img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{p.name}</figcaption></figure>" for p in plots
    )
    blocks = []
    if not samples.is_empty():
        ok = samples.filter(pl.col("status") == "ok")
        for suite in sorted(set(ok["suite"].to_list())):
            items = []
            for model in models:
                for row in ok.filter((pl.col("suite") == suite) & (pl.col("model") == model)).head(examples) \
                        .iter_rows(named=True):
                    verdict = [f"refusal (rule): {row['refused_rule']}"]
                    if row["p_good"] is not None:
                        verdict.append(f"judge P(good) {row['p_good']:.2f}")
                    items.append(f"<div class='ex'><b>{html.escape(model)}</b> · {html.escape(row['kind'])} · "
                                 f"{' · '.join(verdict)}<p class='q'>{html.escape(row['prompt'][:500])}</p>"
                                 f"<p>{html.escape((row['response'] or '')[:800])}</p></div>")
            blocks.append(f"<h3>{html.escape(suite)}</h3>{''.join(items)}")
        failed = samples.filter(pl.col("status") != "ok")
        if not failed.is_empty():
            lines = "".join(f"<li>{html.escape(r['model'])} · {html.escape(r['suite'])}: "
                            f"{html.escape((r['error'] or '')[:300])}</li>"
                            for r in failed.head(20).iter_rows(named=True))
            blocks.append(f"<h3>Failures ({failed.height} samples)</h3><ul>{lines}</ul>")
    run = metrics.get("run", {})
    if run.get("failed_not_recorded"):
        blocks.append(f"<p class='bad'>{run['failed_not_recorded']} calls failed after retries and were not recorded; "
                      "rerun the same command to retry them.</p>")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cai-async evaluation</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:6px 10px;text-align:left;vertical-align:top}}
.good{{background:#d8f5d8}}.bad{{background:#f8d8d8}}figure{{display:inline-block;margin:1em}}
img{{max-width:100%}}.ex{{border-left:3px solid #ccc;padding-left:8px;margin:8px 0}}.q{{color:#555}}</style>
</head><body><h1>Evaluation: {html.escape(", ".join(models))}</h1>
<p>Rates with 95% Wilson intervals; small samples give wide intervals. Harmfulness and refusals are judged by
the judge under the comparison principles; refusals are also counted by a transparent rule set.</p>
<table><tr><th>metric</th>{head}</tr>{''.join(rows)}</table>
{_guard_table(metrics.get("guard") or {})}
{images}
{gaps_html(gaps) if gaps else ""}
<h2>Examples</h2>{''.join(blocks)}
</body></html>
"""
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
