"""Generate responses for prompts through the ``policy`` group; Parquet shards, resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from backends.types import ChatRequest
from cai_async.engine import Engine
from cai_async.prompts import PromptRow, PromptSource
from cai_async.stages.common import StageReport, write_rows
from cai_async.store import ShardWriter

__all__ = ["GenerateConfig", "GenerateReport", "run_generate"]


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


async def run_generate(engine: Engine, config: GenerateConfig, out_dir: str | Path) -> GenerateReport:
    """Answer every prompt not already in ``out_dir``; finished rows are written as they arrive."""
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

    await write_rows(engine, todo, answer, writer, report, concurrency=engine.item_concurrency(config.role))
    return report
