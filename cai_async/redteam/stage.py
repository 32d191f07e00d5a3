"""The redteam stage (recipe key ``redteam``, command ``cai redteam``): every seed × strategy × variant is one
attempt, run through the engine (cached, budgeted, resumable: an attempt is written when it finishes, a rerun
skips the written ones) into ``RUN_DIR/redteam/attempts/``; then the principle gaps into
``RUN_DIR/redteam/gaps.json``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
from pydantic import field_validator

from backends.errors import CaiError, ConfigError
from cai_async.constitution import ComparisonSet
from cai_async.constitution_io import load_comparison_set
from cai_async.engine import Engine
from cai_async.guard.config import GuardConfig
from cai_async.guard.core import Guard
from cai_async.public_data import HUB_DIR
from cai_async.redteam.attempt import AttackContext
from cai_async.redteam.config import RedteamConfig
from cai_async.redteam.gaps import principle_gaps
from cai_async.redteam.seeds import Seed, load_seeds
from cai_async.redteam.strategy import Strategy, strategy, strategy_names
from cai_async.redteam.written import written_seeds
from cai_async.stages.common import MESSAGES, StageReport, write_rows
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
    recipe_section,
    resolve_path,
)
from cai_async.store import ShardWriter, read_shards, write_json

__all__ = ["ATTEMPT_SCHEMA", "STAGE", "CheckedRedteamConfig", "RedteamReport", "RedteamStage", "RedteamStageReport",
           "attempt_items", "run_redteam"]

ATTEMPT_SCHEMA: dict[str, Any] = {
    "id": pl.String, "status": pl.String, "strategy": pl.String, "variant": pl.String, "seed_id": pl.String,
    "seed_source": pl.String, "behaviour": pl.String, "harmful": pl.Boolean, "conversation": MESSAGES,
    "prompt": pl.String, "answer": pl.String,
    "scores": pl.List(pl.Struct({"principle": pl.String, "p_good": pl.Float64})),
    "flagged": pl.List(pl.String), "refused": pl.Boolean, "success": pl.Boolean, "uncovered": pl.Boolean,
    "iterations": pl.Int64, "steps": pl.List(pl.String), "target_calls": pl.Int64, "attacker_calls": pl.Int64,
    "judge_calls": pl.Int64,
    "prompt_tokens": pl.Int64, "completion_tokens": pl.Int64, "cached_calls": pl.Int64, "cost_usd": pl.Float64,
}
"""One row per attempt."""


@dataclass(frozen=True, slots=True)
class _Item:
    id: str
    strategy: Strategy
    variant: str
    seed: Seed


def attempt_items(config: RedteamConfig, seeds: list[Seed]) -> list[_Item]:
    """Every attempt of ``config`` on ``seeds``, strategy by strategy, variant by variant; the id is
    ``strategy/variant/seed`` (``-`` for the unnamed variant)."""
    items = []
    for name in config.strategies:
        unit = strategy(name)
        for variant in unit.variants(config):
            items += [_Item(f"{name}/{variant or '-'}/{seed.id}", unit, variant, seed) for seed in seeds]
    return items


@dataclass
class RedteamReport(StageReport):
    """What a redteam run did, and what it found over all attempts written so far."""

    successes: int = 0
    uncovered: int = 0

    def counts(self) -> dict[str, int]:
        """Successful attacks and uncovered ones (over every attempt in the run directory)."""
        return {"successes": self.successes, "uncovered": self.uncovered}


@dataclass
class RedteamStageReport(StageResult):
    """What the redteam stage did (its ``summary.json`` entry ``redteam``): the attempts
    (:class:`RedteamReport`) and where the gaps are, with their attempts and success rate per strategy."""

    attempts: RedteamReport
    gaps: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """The attempts' counts, then ``gaps``."""
        data = self.attempts.to_json()
        data["gaps"] = self.gaps
        return data

    def failure_count(self) -> int:
        """The attempts' failures."""
        return self.attempts.failure_count()

    def stopped_early(self) -> str | None:
        """Why the attempts stopped early."""
        return self.attempts.stopped_early()


@dataclass
class _Attempts:
    """One attempt and its row, on ``engine``: a method of an object holding the engine, so ``executor: ray`` runs
    attempts on its actors, each rebound to the actor's engine."""

    engine: Engine
    config: RedteamConfig
    principles: ComparisonSet
    guard: Guard | None = None

    async def attempt(self, item: _Item) -> dict[str, Any]:
        """Run ``item``'s strategy on its seed; the row (conversation, verdict, calls and cost)."""
        context = AttackContext(self.engine, self.config, self.principles, item.seed, guard=self.guard)
        attack = await item.strategy.attack(context, item.seed, item.variant)
        verdict = attack.verdict
        prompt = next((m["content"] for m in reversed(attack.conversation) if m["role"] == "user"), "")
        return {
            "id": item.id, "status": "ok", "strategy": item.strategy.name, "variant": item.variant,
            "seed_id": item.seed.id, "seed_source": item.seed.source, "behaviour": item.seed.behaviour,
            "harmful": item.seed.harmful, "conversation": attack.conversation, "prompt": prompt,
            "answer": attack.conversation[-1]["content"] if attack.conversation else "",
            "scores": [{"principle": name, "p_good": p} for name, p in verdict.scores.items()],
            "flagged": list(verdict.flagged), "refused": verdict.refused, "success": verdict.success,
            "uncovered": verdict.success and item.seed.harmful is True and not verdict.flagged,
            "iterations": attack.iterations, "steps": list(attack.steps), **context.usage(),
        }


async def run_redteam(engine: Engine, config: RedteamConfig, out_dir: str | Path, *,
                      guard: GuardConfig | None = None,
                      executor: ItemExecutor | None = None) -> tuple[RedteamReport, dict[str, Any]]:
    """Run every attempt not already in ``out_dir/attempts``; write and return the gaps over all of them. With
    ``config.through_guard`` the target answers behind ``guard`` (the recipe's guard section)."""
    out = Path(out_dir)
    behind = _guard(engine, config, guard)
    principles = load_comparison_set(config.principles)
    seeds = load_seeds(config)
    if "attacker" in config.seeds:
        engine.group(config.attacker)
        seeds += await written_seeds(engine, config, principles)
    items = attempt_items(config, seeds)
    roles = {config.target, config.judge_role} | ({config.attacker} if "attacker" in config.seeds or any(
        i.strategy.uses_attacker for i in items) else set())
    for role in sorted(roles):
        engine.group(role)  # a missing group is one clear error before any call
    writer = ShardWriter(out / "attempts", shard_rows=config.shard_rows, schema=ATTEMPT_SCHEMA, flush_every_s=5)
    done = writer.existing_ids()
    todo = [item for item in items if item.id not in done]
    report = RedteamReport(total=len(items), skipped=len(items) - len(todo))

    attempts = _Attempts(engine, config, principles, behind)
    # the guard holds this process's engine: attempts behind it run here; the others can run on Ray actors
    await write_rows(engine, todo, attempts.attempt, writer, report, concurrency=engine.item_concurrency(*roles),
                     executor=executor if behind is None else None)
    rows = read_shards(out / "attempts").to_dicts()
    gaps = principle_gaps(rows, [p.name for p in principles.principles])
    write_json(out / "gaps.json", gaps)
    report.successes, report.uncovered = gaps["successes"], len(gaps["uncovered"])
    return report, gaps


def _guard(engine: Engine, config: RedteamConfig, guard: GuardConfig | None) -> Guard | None:
    """The guard the target answers behind (``through_guard``), built before any call; None without it."""
    if not config.through_guard:
        return None
    if guard is None:
        raise ConfigError("redteam.through_guard: the recipe has no guard section to attack the target behind; "
                          "add one (see recipes/guard.yaml) or drop through_guard")
    return Guard(engine, guard)


class CheckedRedteamConfig(RedteamConfig):
    """The recipe's redteam section, its strategies checked against the registry (here, above the strategies, so
    the config module stays below them)."""

    @field_validator("strategies")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        known = strategy_names()
        unknown = [name for name in value if name not in known]
        if unknown:
            raise ValueError(f"unknown strategies {', '.join(unknown)} (registered: {', '.join(known)})")
        if len(set(value)) != len(value):
            raise ValueError("strategies: each name once")
        return value


class RedteamStage(StageUnit[RedteamConfig]):
    """The redteam stage."""

    name = "redteam"
    config_type = CheckedRedteamConfig
    command = StageCommand(
        name="redteam",
        help="Attack the target group with seed behaviours × strategies; judge each answer per principle; write "
             "the principle gaps (RUN_DIR/redteam/gaps.json).",
        flags=(
            StageFlag(name="input", key="redteam.input", help="A file of your own seed behaviours."),
            StageFlag(name="n", key="redteam.n", type=int, help="Seeds drawn from each bundled set."),
            StageFlag(name="strategies", key="redteam.strategies", help="Comma-separated strategy names.",
                      convert=lambda text: [s.strip() for s in str(text).split(",") if s.strip()]),
            StageFlag(name="target", key="redteam.target", help="The engine group to attack."),
        ),
        recipe_required=True,
        recipe_help="Recipe with a redteam section and the engine (target, judge, attacker groups).",
        output="stage",
    )

    def roles(self, config: RedteamConfig) -> set[str]:
        """The target, the judge, and the attacker when a strategy rewrites attacks."""
        attacker = "attacker" in config.seeds or any(strategy(name).uses_attacker for name in config.strategies)
        return {config.target, config.judge_role} | ({config.attacker} if attacker else set())

    async def run(self, context: StageContext, config: RedteamConfig, entry: str) -> RedteamStageReport:
        """Attempts into ``redteam/attempts/``, gaps into ``redteam/gaps.json``."""
        out = context.run_dir / "redteam"
        report, gaps = await run_redteam(context.require_engine(), config, out,
                                         guard=recipe_section(context.recipe, "guard", GuardConfig),
                                         executor=context.executor)
        return RedteamStageReport(report, {"path": str(out / "gaps.json"), "attempts": gaps["attempts"],
                                           "success_rate": {s: e["value"] for s, e in gaps["strategies"].items()}})

    def plan(self, recipe: RecipeView, count: Count) -> list[StagePlan]:
        """Per attempt, at most: the strategy's target calls, attacker calls, and every principle's judge on each
        judged answer."""
        config = self.config(recipe)
        if config is None:
            return []
        target = StagePlan("redteam", config.target)
        judge = StagePlan("redteam", config.judge_role)
        attacker = StagePlan("redteam", config.attacker)
        try:
            seeds = load_seeds(config)
            principles = len(load_comparison_set(config.principles).principles)
            if "attacker" in config.seeds:  # written when the stage runs: estimated at per_principle each
                attacker.add(principles, principles * 150, principles * config.attacker_max_tokens)
                attacker.notes.append(f"attacker-written seeds estimated at {config.per_principle} per principle")
                seeds += [Seed(f"attacker-{i}", "x" * 80, None, "attacker")
                          for i in range(config.per_principle * principles)]
            items = attempt_items(config, seeds)
        except CaiError:
            return [target, judge]
        for item in items:
            calls = item.strategy.calls(config)
            tokens = count(item.seed.behaviour) + 60
            target.add(calls.target, calls.target * tokens, calls.target * config.max_tokens)
            judge.add(calls.judged * principles, calls.judged * principles * (tokens + config.max_tokens + 80),
                      calls.judged * principles)
            attacker.add(calls.attacker, calls.attacker * (2 * tokens + config.max_tokens + 150),
                         calls.attacker * config.attacker_max_tokens)
        target.rounds = max((i.strategy.calls(config).target for i in items), default=1)
        return [target, judge, *([attacker] if attacker.calls else [])]

    def resolve(self, config: RedteamConfig, base: Path) -> None:
        """The seed file and a local data folder."""
        config.input = resolve_path(base, config.input)
        if config.data_dir and config.data_dir != HUB_DIR:
            config.data_dir = resolve_path(base, config.data_dir)

    def inputs(self, config: RedteamConfig, entry: str, run_dir: Path) -> list[StageInput]:
        """The user's seed file, when one is set (the bundled seeds are always there)."""
        return super().inputs(config, entry, run_dir) if config.input else []

    def missing(self, config: RedteamConfig | None, source: str) -> str | None:
        """A redteam section."""
        return None if config is not None else (
            f"{source}: no redteam section (seeds, strategies, target; see recipes/redteam.yaml)")


STAGE = RedteamStage()
"""The registered unit."""
