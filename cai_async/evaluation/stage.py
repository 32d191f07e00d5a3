"""Evaluation as a stage (recipe key ``eval``, command ``cai eval``): models × suites → judged samples, metrics,
an HTML report. It runs last, in an engine of its own, so a model trained earlier in the run can be one of the
models."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai_async.engine import Engine
from cai_async.evaluation.run import EvalConfig, run_eval
from cai_async.gap_report import read_gaps
from cai_async.guard.config import GuardConfig
from cai_async.public_data import HUB_DIR
from cai_async.stages.unit import (
    Count,
    ItemExecutor,
    RecipeView,
    StageCommand,
    StageContext,
    StageFlag,
    StagePlan,
    StageResult,
    StageUnit,
    recipe_section,
    resolve_path,
)
from cai_async.store import read_shards, write_json

__all__ = ["STAGE", "EvalReport", "EvalStage", "plan_eval", "run_eval_stage"]


@dataclass
class EvalReport(StageResult):
    """What the evaluation did (its ``summary.json`` entry ``eval``): the metrics (per model; ``run``: samples
    written, failed; ``report``: the HTML report's path)."""

    metrics: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """The metrics, as written."""
        return dict(self.metrics)

    def failure_count(self) -> int:
        """The samples recorded with an error, over every model."""
        models: dict[str, Any] = self.metrics.get("models") or {}
        return sum(int(entry.get("errors") or 0) for entry in models.values() if isinstance(entry, dict))


async def run_eval_stage(engine: Engine, config: EvalConfig, run_dir: Path, *,
                         guard: GuardConfig | None = None, executor: ItemExecutor | None = None) -> EvalReport:
    """Suites → ``eval/samples/``, metrics → ``eval/metrics.json``, report → ``eval/report.html`` + PNGs (with the
    run's red-team gaps, where ``redteam/gaps.json`` is there); with ``guard``, a guarded model beside the bare
    one and the guard alone (see :mod:`cai_async.evaluation.guarded`). The items run on ``executor`` (default
    the engine)."""
    from cai_async.evaluation.report import write_report

    out = run_dir / "eval"
    metrics = await run_eval(engine, config, out, guard=guard, executor=executor)
    write_json(out / "metrics.json", metrics)
    metrics["report"] = str(write_report(metrics, read_shards(out / "samples"), out, gaps=read_gaps(run_dir)))
    return EvalReport(metrics)


def plan_eval(config: EvalConfig, count: Count) -> list[StagePlan]:
    """Estimated calls of the evaluation: every model answers every suite prompt; the judge scores them."""
    from backends.errors import CaiError
    from cai_async.evaluation.suites import load_suite

    ev = config
    plans = {m.group: StagePlan("eval", m.group) for m in ev.models}
    judge = StagePlan("eval", ev.judge_role, rounds=2 if "helpfulness" in ev.suites else 1)
    for suite in ev.suites:
        try:
            prompts = load_suite(suite, ev.data_dir, n=ev.n, seed=ev.seed)
        except CaiError:
            continue
        for model in ev.models:
            for p in prompts:
                plans[model.group].add(1, count(p.prompt), ev.max_tokens)
                if suite != "helpfulness":
                    judge.add(1 + ev.ensemble, (1 + ev.ensemble) * (count(p.prompt) + ev.max_tokens + 80),
                              1 + ev.ensemble)
        if suite == "helpfulness":
            pairs = len(prompts) * (len(ev.models) - 1)
            judge.add(2 * pairs, 2 * pairs * (2 * ev.max_tokens + 120), 2 * pairs)
    return [*plans.values(), judge]


class EvalStage(StageUnit[EvalConfig]):
    """The evaluation stage."""

    name = "eval"
    config_type = EvalConfig
    session = "eval"
    command = StageCommand(
        name="eval",
        help="Evaluate models on harmlessness, over-refusal, jailbreaks and helpfulness; write an HTML report.",
        flags=(
            StageFlag(name="n", key="eval.n", type=int, help="Prompts per suite."),
            StageFlag(name="compare", key="eval.compare", type=tuple[str, str],
                      help="BEFORE AFTER: highlight the deltas.", convert=list),
        ),
        shared=("run_dir", "progress", "budget_usd", "batch", "ray"),
        recipe_required=True,
        recipe_help="Recipe with an eval section (models, suites) and the engine.",
        output="stage",
    )

    def roles(self, config: EvalConfig) -> set[str]:
        """The models' groups and the judge."""
        return {m.group for m in config.models} | {config.judge_role}

    def late_groups(self, config: EvalConfig) -> set[str]:
        """The models' groups: a model the run trains exists only once training ran."""
        return {m.group for m in config.models}

    async def run(self, context: StageContext, config: EvalConfig, entry: str) -> EvalReport:
        """See :func:`run_eval_stage`."""
        return await run_eval_stage(context.require_engine(), config, context.run_dir,
                                    guard=recipe_section(context.recipe, "guard", GuardConfig),
                                    executor=context.executor)

    def plan(self, recipe: RecipeView, count: Count) -> list[StagePlan]:
        """See :func:`plan_eval`."""
        config = self.config(recipe)
        return plan_eval(config, count) if config is not None else []

    def resolve(self, config: EvalConfig, base: Path) -> None:
        """A local data folder (not the Hub's)."""
        if config.data_dir and config.data_dir != HUB_DIR:
            config.data_dir = resolve_path(base, config.data_dir)

    def missing(self, config: EvalConfig | None, source: str) -> str | None:
        """An eval section."""
        return None if config is not None else f"{source}: no eval section (models: [{{name, group}}], suites, n)"


STAGE = EvalStage()
"""The registered unit."""
