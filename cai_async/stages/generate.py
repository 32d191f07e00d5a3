"""Generate responses for prompts through the ``policy`` group; Parquet shards, resumable."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from backends.errors import CaiError
from backends.types import ChatRequest, ChatResult
from cai_async.engine import Engine
from cai_async.prompts import PromptRow, load_prompts
from cai_async.store import ShardWriter

__all__ = ["GenerateConfig", "GenerateReport", "run_generate"]


class GenerateConfig(BaseModel):
    """Options of the generate stage."""

    model_config = ConfigDict(extra="forbid")

    input: str = ""
    prompt_column: str = "prompt"
    id_column: str | None = None
    system_prompt: str | None = None
    max_tokens: int = Field(default=128, ge=1)
    temperature: float = Field(default=0.0, ge=0)
    seed: int | None = 0
    role: str = "policy"
    limit: int | None = Field(default=None, ge=1)
    shard_rows: int = Field(default=64, ge=1)


@dataclass
class GenerateReport:
    """What a generate run did."""

    total: int = 0
    skipped: int = 0
    written: int = 0
    failed: int = 0
    failures: list[dict[str, str]] = field(default_factory=list)
    stopped: str | None = None
    seconds: float = 0.0


async def run_generate(engine: Engine, config: GenerateConfig, out_dir: str | Path) -> GenerateReport:
    """Answer every prompt not already in ``out_dir``; finished rows are written as they arrive."""
    prompts = load_prompts(config.input, column=config.prompt_column, id_column=config.id_column)
    if config.limit:
        prompts = prompts[: config.limit]
    writer = ShardWriter(out_dir, shard_rows=config.shard_rows)
    done = writer.existing_ids()
    todo = [p for p in prompts if p.id not in done]
    report = GenerateReport(total=len(prompts), skipped=len(prompts) - len(todo))
    start = time.perf_counter()

    async def call(row: PromptRow) -> ChatResult:
        messages = row.conversation()
        if config.system_prompt:
            messages.insert(0, {"role": "system", "content": config.system_prompt})
        request = ChatRequest(
            messages, max_tokens=config.max_tokens, temperature=config.temperature, seed=config.seed
        )
        return await engine.chat(config.role, request)

    def on_result(row: PromptRow, outcome: ChatResult | CaiError) -> None:
        if isinstance(outcome, CaiError):
            report.failed += 1
            report.failures.append({"id": row.id, "error": f"{type(outcome).__name__}: {outcome}"})
            return
        record: dict[str, Any] = {
            "id": row.id,
            "prompt": row.prompt,
            "messages": row.conversation(),
            "response": outcome.text,
            "finish_reason": outcome.finish_reason,
            "model": outcome.model,
            "endpoint": outcome.endpoint,
            "prompt_tokens": outcome.usage.prompt_tokens,
            "completion_tokens": outcome.usage.completion_tokens,
            "latency_s": outcome.latency_s,
            "cached": outcome.cached,
        }
        writer.add(record)

    try:
        batch = await engine.run_batch(todo, call, on_result=on_result, total=len(todo))
        report.stopped = batch.stopped
    finally:
        writer.flush()
        report.written = writer.written
        report.seconds = time.perf_counter() - start
    return report
