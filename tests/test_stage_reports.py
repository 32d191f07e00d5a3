"""Each stage entry returns a typed report (``StageResult``): its ``summary.json`` entry (``to_json``), its own
failure count and whether it stopped early — the same figures the reader of a summary read back
(``exitcodes.failure_count``, ``exit_code``) finds in that entry. The runner hands the reports to its caller, and
the stages' items run on the executor the stage context carries (the engine, or Ray's)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest

from cai_async.engine import Engine, EngineConfig
from cai_async.evaluation.stage import EvalReport
from cai_async.exitcodes import FAILED_ROWS, OK, STOPPED, exit_code, failure_count, outcome_code
from cai_async.recipes import Recipe, run_recipe
from cai_async.redteam.stage import RedteamReport, RedteamStageReport
from cai_async.scale import RayConfig, executor_scope
from cai_async.stages.generate import GenerateReport
from cai_async.stages.label import LabelReport
from cai_async.stages.pairs import PairsReport
from cai_async.stages.rl import RLStageReport
from cai_async.stages.sl import SLReport, SLStageReport
from cai_async.stages.train import TrainReport
from cai_async.stages.unit import StageContext, StageResult, recipe_section
from tests.conftest import TestServer

FAILURE = {"id": "x", "error": "Boom: no", "class": "Boom"}


def _reports(stopped: str | None = None) -> dict[str, StageResult]:
    return {
        "generate": GenerateReport(total=5, skipped=1, errors_kept=1, written=3, failed=1, failures=[FAILURE],
                                   stopped=stopped),
        "sl": SLStageReport(chains=SLReport(total=4, failed=1, errors_kept=2, ok=1, errors=3, stopped=stopped),
                            gates={"revision_steps": 0}, exports={"sft": {"path": "p", "rows": 1}},
                            helpful=GenerateReport(total=2, failed=2, errors_kept=1)),
        "rl": RLStageReport(labels=LabelReport(total=3, failed=1, errors=2, labelled=1, stopped=stopped),
                            pairs=PairsReport(total=2, written=1, failed=1, errors_kept=1, identical_dropped=1),
                            exports={"dpo": {"path": "d", "rows": 0}}, dropped={"pairs": 3, "why": None}),
        "redteam": RedteamStageReport(RedteamReport(total=2, failed=1, errors_kept=1, successes=1, stopped=stopped),
                                      {"path": "g", "attempts": 2, "success_rate": {}}),
        "train/sft": TrainReport({"stage": "sft", "rows": 4, "seconds": 1.0}),
        "eval": EvalReport({"models": {"a": {"errors": 2}, "b": {"errors": 0}}, "run": {"failed_not_recorded": 1},
                            "report": "r.html"}),
    }


@pytest.mark.parametrize("stopped", [None, "budget reached"])
def test_each_report_counts_what_the_summary_reader_counts(stopped: str | None) -> None:
    reports = _reports(stopped)
    for name, report in reports.items():
        data = report.to_json()
        json.dumps(data)  # plain JSON
        assert report.failure_count() == failure_count(data), name
        assert bool(report.stopped_early()) == bool(data.get("stopped")), name
    assert [reports[n].failure_count() for n in reports] == [2, 6 + 3, 3 + 2, 2, 0, 2]
    summary = {"stages": {name: report.to_json() for name, report in reports.items()}}
    live = outcome_code(stopped=any(r.stopped_early() for r in reports.values()),
                        failed=sum(r.failure_count() for r in reports.values()))
    assert exit_code(summary) == live == (STOPPED if stopped else FAILED_ROWS)
    assert outcome_code(stopped=False, failed=0) == OK


def test_the_summary_entries_keep_their_layout() -> None:
    reports = _reports()
    common = ["total", "skipped_already_done", "errors_kept", "written", "failed", "failures", "failure_classes",
              "stopped", "seconds"]
    assert list(reports["generate"].to_json()) == common
    assert reports["generate"].to_json()["failure_classes"] == {"Boom": 1}
    assert list(reports["sl"].to_json()) == [*common, "ok", "errors", "gates", "helpful", "exports"]
    rl = reports["rl"].to_json()
    assert list(rl) == [*common, "labelled", "abstained", "errors", "pairs", "exports", "dropped"]
    assert list(rl["pairs"])[:3] == ["prompts", "pairs_written", "identical_dropped"]
    assert (rl["pairs"]["prompts"], rl["pairs"]["pairs_written"]) == (2, 1)
    assert list(reports["redteam"].to_json()) == [*common, "successes", "uncovered", "gaps"]
    assert reports["train/sft"].to_json() == {"stage": "sft", "rows": 4, "seconds": 1.0}


def test_sections_are_read_by_type() -> None:
    recipe = Recipe.model_validate({"sl": {"input": "p.jsonl"}})
    from cai_async.stages.sl import SLConfig

    assert recipe_section(recipe, "sl", SLConfig) is recipe.sl
    assert recipe_section(recipe, "guard", SLConfig) is None
    assert StageContext(run_dir=Path("."), recipe=recipe).executor is None


@pytest.mark.anyio
async def test_the_local_executor_is_the_engine(tmp_path: Path) -> None:
    async with Engine(EngineConfig(progress="off"), run_dir=tmp_path) as engine, \
            executor_scope("local", RayConfig(), engine, tmp_path) as executor:
        assert executor is engine
        seen: list[Any] = []
        report = await executor.run_batch([1, 2, 3], _double, on_result=lambda item, out: seen.append((item, out)))
        assert sorted(seen) == [(1, 2), (2, 4), (3, 6)] and report.submitted == 3


async def _double(value: int) -> int:
    return value * 2


def test_the_runner_hands_back_each_entrys_report(tmp_path: Path, server: TestServer) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"p {i}"}) + "\n" for i in range(3)))
    recipe = Recipe.model_validate({
        "run_dir": str(tmp_path / "run"), "generate": {"input": str(prompts)},
        "engine": {"progress": "off", "groups": {"policy": [
            {"backend": "openai", "model": "m", "base_url": server.base_url}]}}})
    reports: dict[str, StageResult] = {}
    summary = anyio.run(lambda: run_recipe(recipe, reports=reports))
    (report,) = reports.values()
    assert isinstance(report, GenerateReport) and report.written == 3 and report.failure_count() == 0
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    entry = on_disk["stages"]["generate"]
    assert entry == summary["stages"]["generate"]
    assert {k: v for k, v in entry.items() if k != "usage"} == json.loads(json.dumps(report.to_json()))
