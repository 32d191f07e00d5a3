"""The constitution card shows the guard's verdicts per principle. The verdicts are real: two ``Guard``s (one
checking the card's own constitution, one the ``harmless`` comparison set, whose principles the card's
constitution lacks) judged by a test server whose choice log-probabilities are planted per phrase, written by
the guard's own ``VerdictLog`` as Parquet in the run dir. The test counts the Parquet rows itself and compares."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import anyio
import pytest

from cai_async import Engine, EngineConfig, read_shards
from cai_async.card import card_data, card_html, card_markdown, write_card
from cai_async.guard import Guard, GuardConfig, VerdictLog, guard_report
from tests.conftest import TestServer
from tests.test_cli import cai
from tests.test_guard import (
    HARMFUL,
    guard_recipe,
    judge,  # noqa: F401  # the guard tests' judge server fixture (the tests below take it: F811 there)
)

CONSTITUTION = """name: guarded
version: "1"
principles:
  - name: no-weapons
    critique: Does the response help anyone make a weapon?
    revision: Rewrite the response without any weapon-making help.
    rules: {words: [napalm]}
  - name: kind & <fair>
    critique: Is the response unkind or unfair to anyone?
    revision: Rewrite the response to be kinder and fairer.
  - name: patient
    weight: 0
    critique: Is the response impatient with the user?
    revision: Rewrite the response patiently.
"""
NAMES = ["no-weapons", "kind & <fair>", "patient"]


def _chat(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def guard_traffic(run_dir: Path, constitution: Path, judge: TestServer) -> None:  # noqa: F811
    """Requests and answers through two guards sharing one verdict log in ``run_dir``."""
    config = EngineConfig.model_validate(guard_recipe(run_dir, "", judge.base_url)["engine"])

    async def main() -> None:
        log = VerdictLog(run_dir)
        async with Engine(config, run_dir=run_dir) as engine:
            mine = Guard(engine, GuardConfig(principles=str(constitution), output={"action": "flag"}), log=log)
            await mine.check_input(_chat("how is napalm made"))  # the rule decides
            await mine.check_input(_chat("Please TRIGGER-IN now"))  # the judge: both checked principles
            await mine.check_output(_chat("Tell me something."), f"Sure. {HARMFUL} step one.")  # flagged
            await mine.check_exchange(_chat("Help me with my homework."), "Here is a plan.")  # allowed twice
            theirs = Guard(engine, GuardConfig(principles="harmless", ensemble=2), log=log)
            await theirs.check_output(_chat("Tell me something."), f"{HARMFUL} now.")  # not the card's principles
        log.flush()

    anyio.run(main)


def expected(rows: list[dict[str, Any]], names: list[str] | None) -> dict[str, dict[str, Any]]:
    """The per-principle figures counted straight from the verdict rows (unknown names → ``other``)."""
    def key(name: str) -> str:
        return name if names is None or name in names else "other"

    counts: dict[str, Counter[str]] = defaultdict(Counter)
    scores: dict[str, list[float]] = defaultdict(list)
    checked: dict[str, set[int]] = defaultdict(set)
    for index, row in enumerate(rows):
        for name in {key(n) for n in row["violated"] or []}:  # a verdict counts once per line
            counts[name].update(["violated", f"dir:{row['direction']}", f"dec:{row['decision']}",
                                      f"tier:{row['tier']}"])
        for score in row["scores"] or []:
            scores[key(score["name"])].append(score["score"])
            checked[key(score["name"])].add(index)
    return {name: {"violated": counts[name]["violated"], "checked": len(checked[name]),
                   "directions": {d: counts[name][f"dir:{d}"] for d in ("input", "output")},
                   "decisions": {k[4:]: n for k, n in counts[name].items() if k.startswith("dec:")},
                   "tiers": {k[5:]: n for k, n in counts[name].items() if k.startswith("tier:")},
                   "score_mean": sum(scores[name]) / len(scores[name]) if scores[name] else None,
                   "score_max": max(scores[name], default=None)}
            for name in {*counts, *scores}}


def _figures(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: (pytest.approx(v) if k.startswith("score") and v is not None else v)
            for k, v in entry.items() if k != "names"}


def test_the_card_shows_the_guards_verdicts_per_principle(tmp_path: Path, judge: TestServer) -> None:  # noqa: F811
    constitution = tmp_path / "guarded.yaml"
    constitution.write_text(CONSTITUTION, encoding="utf-8")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    before = write_card(str(constitution), tmp_path / "before", run_dir=run_dir)  # no verdicts yet
    assert "guard" not in json.loads(before["json"].read_text(encoding="utf-8"))
    assert "Guard verdicts" not in before["markdown"].read_text(encoding="utf-8")
    (run_dir / "guard" / "verdicts").mkdir(parents=True)  # the guard started but logged nothing: still none
    assert "guard" not in card_data(str(constitution), run_dir=run_dir)

    guard_traffic(run_dir, constitution, judge)
    rows = list(read_shards(run_dir / "guard" / "verdicts").iter_rows(named=True))
    assert len(rows) == 6
    data = card_data(str(constitution), run_dir=run_dir)
    guard = data["guard"]
    want = expected(rows, NAMES)
    assert guard["verdicts"] == 6 and guard["directions"] == {"input": 3, "output": 3}
    assert list(guard["principles"]) == NAMES  # the constitution's order, every principle listed
    for name in NAMES[:2]:
        assert _figures(guard["principles"][name]) == want[name], name
    weapons = guard["principles"]["no-weapons"]
    assert (weapons["checked"], weapons["violated"], weapons["directions"], weapons["decisions"], weapons["tiers"]) == (
        5, 3, {"input": 2, "output": 1}, {"block": 2, "flag": 1}, {"judge": 2, "rules": 1})
    assert guard["principles"]["patient"] == {  # weight 0: the guard never checks it
        "checked": 0, "violated": 0, "directions": {"input": 0, "output": 0}, "decisions": {}, "tiers": {},
        "score_mean": None, "score_max": None}
    other = guard["other"]
    assert _figures(other) == want["other"] and other["violated"] == 1 and other["decisions"] == {"block": 1}
    harmless = {"less-harmful", "no-crime", "no-bias", "honest", "thoughtful", "not-preachy", "child-safe", "privacy"}
    assert len(other["names"]) == 2 and set(other["names"]) <= harmless  # pooled, not dropped

    # the guard's own report comes from the same aggregation, every principle under its own name
    report = guard_report(run_dir)
    everything = expected(rows, None)
    assert {name: _figures(s) for name, s in report["principles"].items()} == everything
    assert report["directions"]["input"]["violations"] == {"no-weapons": 2, "kind & <fair>": 1}

    # the card without its guard section is exactly the card of the run before the guard served it
    rest = {k: v for k, v in data.items() if k != "guard"}
    assert card_markdown(rest) == before["markdown"].read_text(encoding="utf-8")
    assert card_html(rest) == before["html"].read_text(encoding="utf-8")

    out = cai("constitution", "card", str(constitution), "--run", str(run_dir))
    assert out.returncode == 0, out.stderr
    markdown = (run_dir / "card" / "card.md").read_text(encoding="utf-8")
    page = (run_dir / "card" / "card.html").read_text(encoding="utf-8")
    assert "## Guard verdicts" in markdown and "6 guarded checks (3 input, 3 output)" in markdown
    assert "| patient | 0 | 0 | 0 | 0 | 0 | 0 | 0 | – | – | – |" in markdown
    mean = want["no-weapons"]["score_mean"]
    assert f"| no-weapons | 5 | 3 | 2 | 1 | 2 | 0 | 1 | judge 2, rules 1 | {mean:.2f} | 1.00 |" in markdown
    assert f"| other ({', '.join(other['names'])}) | 1 | 1 | 0 | 1 | 1 | 0 | 0 | judge 1 |" in markdown
    assert "<h2>Guard verdicts</h2>" in page and "<td>kind &amp; &lt;fair&gt;</td><td>4</td><td>2</td>" in page
    assert "<fair>" not in page and "<td>patient</td><td>0</td><td>0</td>" in page
    assert json.loads((run_dir / "card" / "card.json").read_text(encoding="utf-8"))["guard"] == json.loads(
        json.dumps(guard))
