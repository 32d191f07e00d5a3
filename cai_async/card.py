"""The constitution card: the page a team publishes about its constitution and iterates from — principles in
priority order with weights, critique and revision texts, few-shot and contrast examples, the content hash;
and, given a run, what each principle did there (times applied, early stops, revisions the quality gates
rejected, how much revisions changed the text), the gates' rates, the AI-feedback label quality, the evaluation
deltas, where the guard served the run, how often it found each principle violated and, where the run was
red-teamed, its principle gaps (``redteam/gaps.json``). Written as Markdown and self-contained HTML."""

from __future__ import annotations

import difflib
import html
import json
from pathlib import Path
from typing import Any

import polars as pl

from cai_async.constitution import Constitution
from cai_async.constitution_io import load_constitution
from cai_async.gap_report import gaps_html, gaps_markdown, read_gaps, shown_gaps
from cai_async.gates import GATES, GateTally
from cai_async.store import read_json, read_shards

__all__ = ["card_data", "card_html", "card_markdown", "write_card"]


def _change(before: str, after: str) -> float:
    """How much a revision changed the text: 1 − difflib's similarity ratio (0 = unchanged, 1 = all new)."""
    return 1.0 - difflib.SequenceMatcher(None, before, after, autojunk=False).ratio()


def _principle_stats(constitution: Constitution, chains: pl.DataFrame) -> dict[str, dict[str, Any]]:
    stats: dict[str, dict[str, Any]] = {
        p.name: {"applied": 0, "early_stops": 0, "revisions": 0, "rejected": 0, "changes": []}
        for p in constitution.principles}
    for row in chains.iter_rows(named=True):
        current = row["initial_response"] or ""
        for step in row["rounds"] or []:
            entry = stats.get(step["principle"])
            if entry is None:
                continue
            entry["applied"] += 1
            entry["early_stops"] += bool(step["early_stop"])
            entry["rejected"] += step.get("gate") is not None
            if step["revision"] is not None:
                entry["revisions"] += 1
                entry["changes"].append(_change(current, step["revision"]))
                current = step["revision"]
    for entry in stats.values():
        changes = entry.pop("changes")
        entry["mean_change"] = sum(changes) / len(changes) if changes else None
    return stats


def _read_json(path: Path) -> Any:
    return read_json(path) if path.is_file() else None


def card_data(source: str | Path | Constitution, *, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Everything the card shows, as plain data (also written as ``card.json``)."""
    constitution = load_constitution(source)
    ordered = sorted(constitution.principles, key=lambda p: p.priority)
    data: dict[str, Any] = {
        "name": constitution.name, "version": constitution.version, "description": constitution.description,
        "hash": constitution.content_hash, "draw": constitution.draw,
        "principles": [p.model_dump(mode="json") for p in ordered],
        "few_shot": [e.model_dump(mode="json") for e in constitution.few_shot],
        "run": None,
    }
    if run_dir is None:
        return data
    root = Path(run_dir)
    chains = read_shards(root / "sl")
    matched = "hash"
    if not chains.is_empty():
        mine = chains.filter(pl.col("constitution_hash") == constitution.content_hash)
        if mine.is_empty():
            mine, matched = chains.filter(pl.col("constitution") == constitution.name), "name"
        chains = mine
    run: dict[str, Any] = {"dir": str(root), "chains": chains.height, "matched_by": matched,
                           "principles": _principle_stats(constitution, chains) if not chains.is_empty() else {},
                           "gates": GateTally().update(chains.iter_rows(named=True)).as_dict()}
    quality = _read_json(root / "label_quality" / "report.json")
    if quality is not None:
        run["label_quality"] = {"pairs": quality.get("pairs"), "position_consistency": quality.get(
            "position_consistency"), "per_principle": quality.get("per_principle", [])}
    metrics = _read_json(root / "eval" / "metrics.json")
    if metrics is not None and metrics.get("compare"):
        run["eval"] = {"models": metrics.get("compare_models"), "deltas": metrics["compare"]}
    data["run"] = run
    guard = _guard_section(root, [p.name for p in ordered])
    if guard is not None:
        data["guard"] = guard
    gaps = read_gaps(root)
    if gaps is not None:
        data["redteam"] = shown_gaps(gaps)
    return data


def _guard_section(root: Path, names: list[str]) -> dict[str, Any] | None:
    """The guard's verdicts in the run, per principle of the constitution (None: the guard never served it)."""
    if not (root / "guard" / "verdicts").is_dir():
        return None
    from cai_async.guard.report import principle_verdicts  # the guard's imports are heavy
    from cai_async.guard.verdicts import read_verdicts

    verdicts = read_verdicts(root)
    if verdicts.is_empty():
        return None
    return {"verdicts": verdicts.height, "directions": dict(verdicts["direction"].value_counts(sort=True).iter_rows()),
            **principle_verdicts(verdicts, names=names)}


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


_GATES_HEAD = ["gate", "first attempts failed", "share", "rejected after the retry"]


def _gates_intro(gates: dict[str, Any]) -> str:
    return (f"{gates['revision_steps']} revisions checked: {gates['first_failed']} "
            f"({_pct(gates['first_failed_rate'])}) failed a gate at first, {gates['retry_passed']} of "
            f"{gates['retried']} retries passed, {gates['rejected']} ({_pct(gates['rejected_rate'])}) were rejected "
            f"(the previous response kept); {gates['chains_without_passing']} of {gates['chains']} chains kept no "
            "revision (left out of the exports unless export.keep_failed_gates). A revision may fail several gates.")


def _gates_rows(gates: dict[str, Any]) -> list[list[str]]:
    return [[g, str(gates["by_gate"].get(g, 0)), _pct(gates["by_gate_rate"].get(g, 0.0)),
             str(gates["rejected_by_gate"].get(g, 0))] for g in GATES]


def _score(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


_GUARD_HEAD = ["principle", "checks", "violated", "input", "output", "block", "revise", "flag", "decided by",
               "mean score", "max score"]


def _guard_rows(guard: dict[str, Any]) -> list[list[str]]:
    """The guard table's cells (plain text, unescaped): one row per principle, then ``other`` if any."""
    entries = list(guard["principles"].items())
    if guard["other"] is not None:
        entries.append((f"other ({', '.join(guard['other']['names'])})", guard["other"]))
    return [[name, str(s["checked"]), str(s["violated"]),
             *(str(s["directions"].get(d, 0)) for d in ("input", "output")),
             *(str(s["decisions"].get(d, 0)) for d in ("block", "revise", "flag")),
             ", ".join(f"{tier} {n}" for tier, n in s["tiers"].items()) or "–", _score(s["score_mean"]),
             _score(s["score_max"])] for name, s in entries]


def _guard_intro(guard: dict[str, Any]) -> str:
    directions = ", ".join(f"{n} {d}" for d, n in guard["directions"].items())
    return (f"{guard['verdicts']} guarded checks ({directions}). Per principle: the checks that scored it, those "
            "that found it violated by direction, action and deciding tier, and its violation scores (0–1) over "
            "the checks that scored it. 0 checks: the guard never enforced it here.")


def card_markdown(data: dict[str, Any]) -> str:
    """The card as Markdown."""
    lines = [f"# Constitution card: {data['name']} (v{data['version']})", ""]
    if data["description"]:
        lines += [data["description"], ""]
    lines += [f"Content hash `{data['hash']}` · draw `{data['draw']}` · {len(data['principles'])} principles · "
              f"{len(data['few_shot'])} few-shot examples", "", "## Principles (priority order)", ""]
    for p in data["principles"]:
        tags = f" · tags: {', '.join(p['tags'])}" if p["tags"] else ""
        lines += [f"### {p['name']}", "", f"priority {p['priority']} · weight {p['weight']:g}{tags}", "",
                  f"**Critique request.** {p['critique']}", "", f"**Revision request.** {p['revision']}", ""]
        if p.get("contrast"):
            c = p["contrast"]
            lines += [f"*Contrast example* — request: {c['prompt']} — response: {c['response']}", "",
                      f"- good critique: {c['good']}", f"- bad critique: {c['bad']}", ""]
    if data["few_shot"]:
        lines += ["## Few-shot examples", ""]
        for index, e in enumerate(data["few_shot"], start=1):
            lines += [f"{index}. **User:** {e['prompt']}", f"   **Response:** {e['response']}",
                      f"   **Critique:** {e['critique']}", f"   **Revision:** {e['revision']}", ""]
    run = data["run"]
    if run:
        lines += [f"## In run `{run['dir']}`", "",
                  f"{run['chains']} chains (matched by constitution {run['matched_by']}).", "",
                  "| principle | applied | early stops | revisions | rejected by gates | mean change |",
                  "|---|---|---|---|---|---|"]
        for name, s in run["principles"].items():
            lines.append(f"| {name} | {s['applied']} | {s['early_stops']} | {s['revisions']} | "
                         f"{s.get('rejected', 0)} | {_pct(s['mean_change'])} |")
        gates = run.get("gates")
        if gates and gates["revision_steps"]:
            lines += ["", f"Revision quality gates: {_gates_intro(gates)}", ""]
            lines += ["| " + " | ".join(row) + " |"
                      for row in [_GATES_HEAD, ["---"] * len(_GATES_HEAD), *_gates_rows(gates)]]
        if run.get("label_quality"):
            q = run["label_quality"]
            lines += ["", f"AI-feedback label quality ({q['pairs']} human-labelled pairs, position consistency "
                          f"{_pct(q['position_consistency'])}):", "",
                      "| comparison principle | pairs | accuracy | consistency |", "|---|---|---|---|"]
            for p in q["per_principle"]:
                lines.append(f"| {p['variant']} | {p['pairs']} | {_pct(p['accuracy'])} | "
                             f"{_pct(p['position_consistency'])} |")
        if run.get("eval"):
            before, after = run["eval"]["models"]
            lines += ["", f"Evaluation, {after} − {before}:", ""]
            lines += [f"- {key}: {'–' if d is None else f'{d:+.1%}'}" for key, d in run["eval"]["deltas"].items()]
    if data.get("guard"):
        lines += ["", "## Guard verdicts", "", _guard_intro(data["guard"]), ""]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |"
                  for row in [_GUARD_HEAD, ["---"] * len(_GUARD_HEAD), *_guard_rows(data["guard"])]]
    if data.get("redteam"):
        lines += ["", gaps_markdown(data["redteam"]).rstrip("\n")]
    return "\n".join(lines) + "\n"


_STYLE = """body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;line-height:1.45}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3rem .6rem;text-align:left}
.p{border-left:4px solid #4a7;padding-left:1rem;margin:1.2rem 0}.good{color:#185}.bad{color:#a33}
code{background:#f3f3f3;padding:0 .2rem}small{color:#666}"""


def card_html(data: dict[str, Any]) -> str:
    """The card as one self-contained HTML page (no scripts, no external resources)."""
    e = html.escape
    parts = [f"<h1>Constitution card: {e(data['name'])} <small>v{e(data['version'])}</small></h1>"]
    if data["description"]:
        parts.append(f"<p>{e(data['description'])}</p>")
    parts.append(f"<p>Content hash <code>{e(data['hash'])}</code> · draw <code>{e(data['draw'])}</code> · "
                 f"{len(data['principles'])} principles · {len(data['few_shot'])} few-shot examples</p>")
    parts.append("<h2>Principles (priority order)</h2>")
    for p in data["principles"]:
        block = [f'<div class="p"><h3>{e(p["name"])}</h3><small>priority {p["priority"]} · weight '
                 f'{p["weight"]:g}{" · tags: " + e(", ".join(p["tags"])) if p["tags"] else ""}</small>',
                 f"<p><b>Critique request.</b> {e(p['critique'])}</p>",
                 f"<p><b>Revision request.</b> {e(p['revision'])}</p>"]
        if p.get("contrast"):
            c = p["contrast"]
            block.append(f"<p><i>Contrast example.</i> Request: {e(c['prompt'])}<br>Response: {e(c['response'])}"
                         f"<br><span class=good>Good critique: {e(c['good'])}</span>"
                         f"<br><span class=bad>Bad critique: {e(c['bad'])}</span></p>")
        parts.append("".join(block) + "</div>")
    if data["few_shot"]:
        parts.append("<h2>Few-shot examples</h2><ol>")
        parts += [f"<li><b>User:</b> {e(x['prompt'])}<br><b>Response:</b> {e(x['response'])}<br><b>Critique:</b> "
                  f"{e(x['critique'])}<br><b>Revision:</b> {e(x['revision'])}</li>" for x in data["few_shot"]]
        parts.append("</ol>")
    run = data["run"]
    if run:
        parts.append(f"<h2>In run <code>{e(run['dir'])}</code></h2><p>{run['chains']} chains (matched by "
                     f"constitution {e(run['matched_by'])}).</p><table><tr><th>principle</th><th>applied</th>"
                     "<th>early stops</th><th>revisions</th><th>rejected by gates</th><th>mean change</th></tr>")
        parts += [f"<tr><td>{e(name)}</td><td>{s['applied']}</td><td>{s['early_stops']}</td><td>{s['revisions']}"
                  f"</td><td>{s.get('rejected', 0)}</td><td>{_pct(s['mean_change'])}</td></tr>"
                  for name, s in run["principles"].items()]
        parts.append("</table>")
        gates = run.get("gates")
        if gates and gates["revision_steps"]:
            parts.append(f"<h3>Revision quality gates</h3><p>{e(_gates_intro(gates))}</p><table><tr>"
                         + "".join(f"<th>{e(h)}</th>" for h in _GATES_HEAD) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{e(cell)}</td>" for cell in row) + "</tr>"
                      for row in _gates_rows(gates)]
            parts.append("</table>")
        if run.get("label_quality"):
            q = run["label_quality"]
            parts.append(f"<h3>AI-feedback label quality</h3><p>{q['pairs']} human-labelled pairs, position "
                         f"consistency {_pct(q['position_consistency'])}.</p><table><tr><th>comparison principle"
                         "</th><th>pairs</th><th>accuracy</th><th>consistency</th></tr>")
            parts += [f"<tr><td>{e(p['variant'])}</td><td>{p['pairs']}</td><td>{_pct(p['accuracy'])}</td>"
                      f"<td>{_pct(p['position_consistency'])}</td></tr>" for p in q["per_principle"]]
            parts.append("</table>")
        if run.get("eval"):
            before, after = run["eval"]["models"]
            parts.append(f"<h3>Evaluation: {e(after)} − {e(before)}</h3><ul>")
            parts += [f"<li>{e(key)}: {'–' if d is None else f'{d:+.1%}'}</li>"
                      for key, d in run["eval"]["deltas"].items()]
            parts.append("</ul>")
    if data.get("guard"):
        parts.append(f"<h2>Guard verdicts</h2><p>{e(_guard_intro(data['guard']))}</p><table><tr>"
                     + "".join(f"<th>{e(h)}</th>" for h in _GUARD_HEAD) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{e(cell)}</td>" for cell in row) + "</tr>"
                  for row in _guard_rows(data["guard"])]
        parts.append("</table>")
    if data.get("redteam"):
        parts.append(gaps_html(data["redteam"]))
    body = "\n".join(parts)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Constitution card: '
            f"{e(data['name'])}</title><style>{_STYLE}</style></head><body>\n{body}\n</body></html>\n")


def write_card(source: str | Path | Constitution, out_dir: str | Path, *,
               run_dir: str | Path | None = None) -> dict[str, Path]:
    """Write ``card.md``, ``card.html`` and ``card.json`` into ``out_dir``; return their paths."""
    data = card_data(source, run_dir=run_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "card.md", "html": out / "card.html", "json": out / "card.json"}
    paths["markdown"].write_text(card_markdown(data), encoding="utf-8")
    paths["html"].write_text(card_html(data), encoding="utf-8")
    paths["json"].write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    return paths
