"""Generate responses for prompts through the ``policy`` group; Parquet shards, resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from backends.types import ChatRequest
from cai_async.engine import Engine
from cai_async.prompts import PromptRow, PromptSource
from cai_async.stages.common import StageReport, write_rows
from cai_async.stages.unit import (
    Count,
    ItemExecutor,
    RecipeView,
    StageCommand,
    StageContext,
    StageFlag,
    StagePlan,
    StageUnit,
    load_prompt_texts,
    resolve_path,
)
from cai_async.store import ShardWriter

__all__ = ["STAGE", "GenerateConfig", "GenerateReport", "GenerateStage", "run_generate"]


class GenerateConfig(PromptSource):
    """Options of the generate stage."""

    system_prompt: str | None = None
    max_tokens: int = Field(default=128, ge=1)
    temperature: float = Field(default=0.0, ge=0)
    seed: int | None = 0
    role: str = "policy"
    shard_rows: int = Field(default=64, ge=1)


class GenerateReport(StageReport):
    """What a generate run did."""


async def run_generate(engine: Engine, config: GenerateConfig, out_dir: str | Path, *,
                       executor: ItemExecutor | None = None) -> GenerateReport:
    """Answer every prompt not already in ``out_dir``; finished rows are written as they arrive (the items run on
    ``executor``, default the engine)."""
    prompts = config.load()
    writer = ShardWriter(out_dir, shard_rows=config.shard_rows)
    done = writer.existing_ids()
    todo = [p for p in prompts if p.id not in done]
    report = GenerateReport(total=len(prompts), skipped=len(prompts) - len(todo))

    async def answer(row: PromptRow) -> dict[str, Any]:
        messages = row.conversation()
        if config.system_prompt:
            messages.insert(0, {"role": "system", "content": config.system_prompt})
        request = ChatRequest(
            messages, max_tokens=config.max_tokens, temperature=config.temperature, seed=config.seed
        )
        result = await engine.chat(config.role, request)
        return {
            "id": row.id,
            "prompt": row.prompt,
            "messages": row.conversation(),
            "response": result.text,
            "finish_reason": result.finish_reason,
            "model": result.model,
            "endpoint": result.endpoint,
            "prompt_tokens": result.usage.prompt_tokens,
            "completion_tokens": result.usage.completion_tokens,
            "latency_s": result.latency_s,
            "cached": result.cached,
        }

    await write_rows(engine, todo, answer, writer, report, concurrency=engine.item_concurrency(config.role),
                     executor=executor)
    return report


class GenerateStage(StageUnit[GenerateConfig]):
    """The generate stage (recipe key ``generate``, command ``cai generate``)."""

    name = "generate"
    config_type = GenerateConfig
    command = StageCommand(
        name="generate",
        help="Answer prompts with the policy group and write Parquet (defaults → RECIPE → flags).",
        flags=(StageFlag(name="input", key="generate.input"), StageFlag(name="limit", key="generate.limit", type=int)),
    )

    def roles(self, config: GenerateConfig) -> set[str]:
        """The group that answers."""
        return {config.role}

    async def run(self, context: StageContext, config: GenerateConfig, entry: str) -> GenerateReport:
        """Responses into ``generate/``."""
        return await run_generate(context.require_engine(), config, context.run_dir / "generate",
                                  executor=context.executor)

    def plan(self, recipe: RecipeView, count: Count) -> list[StagePlan]:
        """One call a prompt."""
        config = self.config(recipe)
        if config is None:
            return []
        plan = StagePlan("generate", config.role)
        for text in load_prompt_texts(config):
            plan.add(1, count(text), config.max_tokens)
        return [plan]

    def resolve(self, config: GenerateConfig, base: Path) -> None:
        """The prompt file."""
        config.input = resolve_path(base, config.input)

    def missing(self, config: GenerateConfig | None, source: str) -> str | None:
        """Prompts to answer."""
        return None if config is not None and config.input else (
            "no prompts: pass --input FILE or set generate.input in the recipe")


STAGE = GenerateStage()
"""The registered unit."""
