"""RL-CAI as a stage (recipe key ``rl``, command ``cai label``): response pairs, AI-feedback labels, dpo/reward
exports."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from backends.strict import StrictModel
from cai_async.constitution_io import builtin_comparison_sets
from cai_async.engine import Engine
from cai_async.exports import RL_COLUMNS, RLExportConfig, write_rl_exports
from cai_async.stages.label import LabelConfig, Labeller, LabelReport, abstention_reason, dropped_pairs, label_pairs
from cai_async.stages.pairs import PairsConfig, PairsReport, run_pairs
from cai_async.stages.sl import SLConfig
from cai_async.stages.unit import (
    Count,
    ItemExecutor,
    RecipeView,
    StageCommand,
    StageContext,
    StageFlag,
    StageInput,
    StagePlan,
    StageResult,
    StageUnit,
    load_prompt_texts,
    recipe_section,
    resolve_path,
)
from cai_async.store import scan_shards

__all__ = ["STAGE", "RLConfig", "RLStage", "RLStageReport", "dropped_line", "plan_rl", "run_rl_stage"]

log = logging.getLogger(__name__)


class RLConfig(StrictModel):
    """RL-CAI labelling (recipe key ``label``; ``rl``, its old name, still works): where pairs come from, how they
    are labelled, what is exported."""

    pairs: PairsConfig = Field(default_factory=PairsConfig)
    label: LabelConfig = Field(default_factory=LabelConfig)
    export: RLExportConfig = Field(default_factory=RLExportConfig)


def _pairs_report(report: PairsReport) -> dict[str, Any]:
    data = report.to_json()
    return {"prompts": data.pop("total"), "pairs_written": data.pop("written"),
            "identical_dropped": report.identical_dropped, **data}


@dataclass
class RLStageReport(StageResult):
    """What the label stage did (its ``summary.json`` entry ``label``): the labels (:class:`LabelReport`), the pairs
    (:class:`PairsReport`), the exports, and the pairs the exports left out (with dpo or reward exports)."""

    labels: LabelReport
    pairs: PairsReport
    exports: dict[str, Any]
    dropped: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """The labels' counts, then ``pairs`` (prompts, pairs written, identical responses dropped, …),
        ``exports`` and ``dropped`` (when the stage exports dpo or reward data)."""
        data = self.labels.to_json()
        data["pairs"] = _pairs_report(self.pairs)
        data["exports"] = self.exports
        if self.dropped is not None:
            data["dropped"] = self.dropped
        return data

    def failure_count(self) -> int:
        """The labels' failures and the pairs'."""
        return self.labels.failure_count() + self.pairs.failure_count()

    def stopped_early(self) -> str | None:
        """Why the labelling stopped early."""
        return self.labels.stopped_early()


async def run_rl_stage(
    engine: Engine, config: RLConfig, run_dir: Path, *, retry_errors: bool = False,
    executor: ItemExecutor | None = None,
) -> RLStageReport:
    """Pairs into ``rl/pairs/``, AI-feedback labels into ``rl/labels/``, then the dpo and reward exports; the
    items run on ``executor`` (default the engine)."""
    labeller = Labeller(engine, config.label, run_dir.name)  # a bad comparison set fails before any call
    pairs_report = await run_pairs(engine, config.pairs, run_dir / "rl" / "pairs", run_dir=run_dir,
                                   executor=executor)
    label_report = await label_pairs(labeller, pairs_report.rows, run_dir / "rl" / "labels",
                                     retry_errors=retry_errors, executor=executor)
    labels = scan_shards(run_dir / "rl" / "labels", columns=RL_COLUMNS)
    report = RLStageReport(labels=label_report, pairs=pairs_report,
                           exports=write_rl_exports(run_dir, labels, config.export))
    if config.export.dpo or config.export.reward:
        judges = engine.config.group(config.label.judge_role)
        sampled = any(e.options.get("score_fallback") == "sample" for e in judges)
        drops: dict[str, Any] = dropped_pairs(run_dir / "rl" / "labels", min_confidence=config.export.min_confidence)
        line = dropped_line(drops, config, sampled=sampled, exported=max(
            (int(e.get("rows") or 0) for e in report.exports.values()), default=0))
        report.dropped = {**drops, "why": line}
        if line is not None:
            log.warning("%s", line)
    return report


def dropped_line(drops: dict[str, Any], config: RLConfig, *, sampled: bool, exported: int) -> str | None:
    """One line saying how many labelled pairs the dpo/reward exports left out and why: always when the judge
    abstained (its answer named no choice), else when nothing was exported at all (ties, below
    ``export.min_confidence``); None when there is nothing to say."""
    pairs, abstained, other = drops["pairs"], drops["abstained"], drops["ties"] + drops["unsure"]
    undecided = (f"{other} {'more ' if abstained else ''}left out as ties (P(A) = 0.5: e.g. the two orders "
                 f"disagree) or below export.min_confidence={config.export.min_confidence:g}")
    if abstained:
        reason = abstention_reason(config.label, sampled=sampled)
        return (f"label/labels: {abstained} of {pairs} pairs dropped from the exports: {reason}"
                + (f" ({undecided})" if other else ""))
    if other and not exported:
        return f"label/labels: {other} of {pairs} pairs dropped from the exports, none left: {undecided}"
    return None


def plan_rl(recipe: RecipeView, count: Count) -> list[StagePlan]:
    """Estimated calls of RL-CAI: K samples a prompt (when it generates pairs), and the labeller's judgments."""
    rl, sl = recipe_section(recipe, "label", RLConfig), recipe_section(recipe, "sl", SLConfig)
    if rl is None:
        return []
    pairs_plan, label_plan = StagePlan("label", rl.pairs.policy_role), StagePlan("label", rl.label.judge_role)
    if rl.pairs.source == "generate":
        prompts = load_prompt_texts(rl.pairs)
        for text in prompts:
            pairs_plan.add(rl.pairs.k, rl.pairs.k * count(text), rl.pairs.k * rl.pairs.max_tokens)
        pairs = len(prompts) * rl.pairs.max_pairs_per_prompt
        prompt_len, response_len = (sum(map(count, prompts)) // max(1, len(prompts)), rl.pairs.max_tokens)
    elif rl.pairs.source == "sl" and sl is not None:
        pairs = len(load_prompt_texts(sl))
        prompt_len, response_len = 40, sl.max_tokens
    else:
        pairs = len(load_prompt_texts(rl.pairs)) if rl.pairs.input else 0
        prompt_len, response_len = 40, 128
    judgments = pairs * rl.label.ensemble * (2 if rl.label.swap else 1)
    feedback = prompt_len + 2 * response_len + 60
    output = rl.label.cot.max_tokens if rl.label.cot.enabled else 1
    label_plan.add(judgments, judgments * feedback, judgments * output)
    label_plan.notes.append(f"{pairs} pairs × {rl.label.ensemble} principles × {2 if rl.label.swap else 1} orders")
    return [pairs_plan, label_plan]


class RLStage(StageUnit[RLConfig]):
    """The RL-CAI stage."""

    name = "label"
    config_type = RLConfig
    exports = ("dpo", "reward")
    command = StageCommand(
        name="label",
        help="RL-CAI: response pairs labelled by AI feedback, then dpo/reward exports (defaults → RECIPE → flags).",
        flags=(
            StageFlag(name="pairs_source", key="label.pairs.source", help="generate | sl | columns"),
            StageFlag(name="input", key="label.pairs.input"),
            StageFlag(name="sl_run", key="label.pairs.sl_run", help="pairs-source sl: the SL-CAI run directory."),
            StageFlag(name="principles", key="label.label.principles", help="Comparison set: built-in name or file."),
            StageFlag(name="ensemble", key="label.label.ensemble", type=int, help="Principles per pair."),
            StageFlag(name="swap", key="label.label.swap", type=bool, decls=("--swap/--no-swap",),
                      help="Score both orders."),
            StageFlag(name="cot", key="label.label.cot.enabled", type=bool, decls=("--cot/--no-cot",),
                      help="Chain-of-thought labels."),
            StageFlag(name="retry_errors", key="retry_errors", type=bool),
            StageFlag(name="limit", key="label.pairs.limit", type=int),
        ),
    )

    def roles(self, config: RLConfig) -> set[str]:
        """The policy that samples pairs and the judge that labels them."""
        return {config.pairs.policy_role, config.label.judge_role}

    async def run(self, context: StageContext, config: RLConfig, entry: str) -> RLStageReport:
        """See :func:`run_rl_stage`."""
        return await run_rl_stage(context.require_engine(), config, context.run_dir,
                                  retry_errors=context.retry_errors, executor=context.executor)

    def plan(self, recipe: RecipeView, count: Count) -> list[StagePlan]:
        """See :func:`plan_rl`."""
        return plan_rl(recipe, count)

    def resolve(self, config: RLConfig, base: Path) -> None:
        """The pairs' input and a comparison-set file."""
        config.pairs.input = resolve_path(base, config.pairs.input)
        if config.label.principles not in builtin_comparison_sets():
            config.label.principles = resolve_path(base, config.label.principles)

    def inputs(self, config: RLConfig, entry: str, run_dir: Path) -> list[StageInput]:
        """The pairs' source (prompts, a file with two response columns, or SL-CAI chains: this run's, written by
        its sl stage, or ``label.pairs.sl_run``'s) and a comparison-set file."""
        pairs = config.pairs
        needs: list[StageInput] = []
        if pairs.source == "sl":
            folder = Path(pairs.sl_run or run_dir) / "sl"
            needs.append(StageInput(
                what="SL-CAI chains", path=folder, ready=lambda: any(folder.glob("*.parquet")),
                fix=f"run the sl stage in {pairs.sl_run} first, or fix label.pairs.sl_run" if pairs.sl_run else
                "add an sl section to the recipe (it runs before label), or set label.pairs.sl_run to a run directory "
                "with SL chains"))
        else:
            what = "prompt file" if pairs.source == "generate" else "pairs file (two response columns)"
            needs.append(StageInput(
                what=what, path=pairs.input, key="label.pairs.input",
                fix="pass --input FILE or set label.pairs.input (prompts, or a file with two response columns), or "
                    "take pairs from SL chains: rl.pairs.source: sl"))
        if config.label.principles not in builtin_comparison_sets():
            needs.append(StageInput(
                what="comparison set", path=config.label.principles, key="label.label.principles",
                fix=f"use a built-in set ({', '.join(builtin_comparison_sets())}) or fix the path"))
        return needs

    def missing(self, config: RLConfig | None, source: str) -> str | None:
        """Pairs to label, or prompts to make them from."""
        if config is None or (config.pairs.source != "sl" and not config.pairs.input):
            return ("no pairs: pass --input FILE (prompts, or a file with two response columns) or "
                    "--pairs-source sl --sl-run RUN_DIR")
        return None


STAGE = RLStage()
"""The registered unit."""
