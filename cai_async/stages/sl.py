"""SL-CAI: prompt → initial response → (critique → revision) × N passes: one principle drawn per pass, or every
principle in priority order (``draw: all``, the method's loop).

Chains run concurrently through the engine; the steps of one chain run in order. Every step is kept in the
chain row (``CHAIN_SCHEMA``). Finished chains are written as Parquet shards; a rerun skips them, and a chain
cut off half-way gets its finished steps back from the engine's cache, so no call is paid twice."""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import polars as pl
from pydantic import BaseModel, ConfigDict, Field, field_validator

from backends.errors import BudgetExceeded, CaiError, InvalidAnswer, PermanentError
from backends.types import ChatRequest, ChatResult
from cai_async.constitution import Constitution, DrawMode, Principle, draw_passes
from cai_async.constitution_io import load_constitution
from cai_async.engine import Engine
from cai_async.exports import ExportConfig
from cai_async.prompts import PromptRow, PromptSource
from cai_async.stages.cleaning import NO_ISSUES_PATTERN, clean_revision
from cai_async.stages.common import (
    CALL_FIELDS,
    MESSAGES,
    StageReport,
    call_fields,
    error_fields,
    finished_ids,
    write_rows,
)
from cai_async.store import ShardWriter

__all__ = [
    "CHAIN_SCHEMA",
    "EarlyStopConfig",
    "EmptyResponse",
    "SLConfig",
    "SLReport",
    "run_sl",
]

Step = Literal["initial", "critique", "revision"]

ROUND_SCHEMA = pl.Struct(
    {
        "round": pl.Int64(),
        "principle": pl.String(),
        "critique_request": pl.String(),
        "critique": pl.String(),
        "revision_request": pl.String(),
        "revision": pl.String(),
        "revision_raw": pl.String(),
        "cleaned": pl.Boolean(),
        "early_stop": pl.Boolean(),
        **{f"critique_{k}": v for k, v in CALL_FIELDS.items()},
        **{f"revision_{k}": v for k, v in CALL_FIELDS.items()},
    }
)
CHAIN_SCHEMA: dict[str, pl.DataType] = {
    "id": pl.String(),
    "run_id": pl.String(),
    "stage": pl.String(),
    "status": pl.String(),
    "error": pl.String(),
    "error_class": pl.String(),
    "error_step": pl.String(),
    "constitution": pl.String(),
    "constitution_hash": pl.String(),
    "prompt": pl.String(),
    "messages": MESSAGES,
    "initial_response": pl.String(),
    "initial_source": pl.String(),
    **{f"initial_{k}": v for k, v in CALL_FIELDS.items()},
    "rounds": pl.List(ROUND_SCHEMA),
    "num_rounds": pl.Int64(),
    "final_response": pl.String(),
    "stopped_early": pl.Boolean(),
    "early_stop_rule": pl.String(),
    "prompt_tokens": pl.Int64(),
    "completion_tokens": pl.Int64(),
    "latency_s": pl.Float64(),
    "created_at": pl.Float64(),
}
"""One row per chain; ``rounds`` holds every critique → revision step with its endpoint, usage and timing."""


class EmptyResponse(InvalidAnswer):
    """An endpoint answered with no text for a step that needs some (endpoint-side: a rerun retries it)."""


class EarlyStopConfig(BaseModel):
    """Stop a chain when the critique finds nothing to fix: ``pattern`` is a case-insensitive regex."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    pattern: str = NO_ISSUES_PATTERN

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        return value


class SLConfig(PromptSource):
    """Options of the SL-CAI stage (recipe key ``sl``)."""

    response_column: str | None = None
    """Take initial responses from this column instead of generating them."""
    constitution: str = "harmless"
    """A built-in name (``seed``, ``harmless``) or a YAML/JSON/TOML file in any supported layout."""
    num_revisions: int = Field(default=1, ge=1, le=32)
    """Revision passes: one principle each, or every principle each with ``draw: all``."""
    draw: DrawMode | None = None
    """How principles are drawn per pass; default: the constitution's own ``draw``."""
    principle_weights: dict[str, float] = Field(default_factory=dict)
    few_shot: int = Field(default=0, ge=0)
    """How many of the constitution's few-shot examples go before each request, as prior turns; when > 0, a
    principle's good/bad critique pair (``contrast``) also goes before its critique request."""
    system_prompt: str | None = None
    early_stop: EarlyStopConfig = Field(default_factory=EarlyStopConfig)
    clean_revisions: bool = True
    max_tokens: int = Field(default=128, ge=1)
    critique_max_tokens: int = Field(default=128, ge=1)
    revision_max_tokens: int = Field(default=128, ge=1)
    temperature: float = Field(default=0.0, ge=0)
    seed: int = 0
    policy_role: str = "policy"
    """The group that writes the initial responses."""
    critic_role: str = "critic"
    """The group that writes the critiques (falls back to ``policy`` when the engine has no such group)."""
    revision_role: str | None = None
    """The group that writes the revisions; default: ``policy_role`` (a stronger critic, the policy revises)."""
    chain_concurrency: int | None = Field(default=None, ge=1)
    """Chains in flight; default: the engine's cap, or one per model when every endpoint is in-process
    llama.cpp (so a chain's steps follow each other and reuse the KV cache)."""
    shard_rows: int = Field(default=64, ge=1)
    flush_every_s: float = Field(default=10.0, gt=0)
    export: ExportConfig = Field(default_factory=ExportConfig)


@dataclass
class SLReport(StageReport):
    """What an SL-CAI run did. ``failed`` chains were not recorded (transient failures, budget): a rerun
    retries them."""

    ok: int = 0
    errors: int = 0
    """Chains recorded with ``status="error"`` (permanent: a rerun does not retry them)."""


class _StepFailed(Exception):
    def __init__(self, step: str, error: CaiError):
        self.step = step
        self.error = error


class ChainRunner:
    """Runs one chain at a time for :func:`run_sl`; holds what every chain shares."""

    def __init__(self, engine: Engine, config: SLConfig, constitution: Constitution, run_id: str):
        self.engine = engine
        self.config = config
        self.constitution = constitution
        self.run_id = run_id
        self.system = [{"role": "system", "content": config.system_prompt}] if config.system_prompt else []
        self.prefix = list(self.system)
        for example in constitution.few_shot[: config.few_shot]:
            self.prefix.extend(example.messages())
        self.stop_rule = re.compile(config.early_stop.pattern, re.IGNORECASE) if config.early_stop.enabled else None

    async def _chat(self, step: str, role: str, messages: list[dict[str, str]], max_tokens: int) -> ChatResult:
        request = ChatRequest(
            messages, max_tokens=max_tokens, temperature=self.config.temperature, seed=self.config.seed
        )
        try:
            result = await self.engine.chat(role, request)
        except BudgetExceeded:
            raise
        except CaiError as exc:
            raise _StepFailed(step, exc) from None
        if not result.text.strip():
            raise _StepFailed(step, EmptyResponse(
                f"endpoint {result.endpoint!r} (model {result.model!r}) answered the {step} step with empty text "
                f"(finish_reason={result.finish_reason!r}); check the model and its max_tokens"
            ))
        return result

    async def revise_step(
        self, number: int, principle: Principle, conversation: list[dict[str, str]], current: str,
        record: dict[str, Any], results: list[ChatResult],
    ) -> str | None:
        """One critique → revision step under ``principle``; the revised text, or None when the critique found
        nothing to fix (early stop)."""
        cfg = self.config
        request = principle.critique_request(teach=cfg.few_shot > 0)
        asked = [*self.prefix, *conversation, {"role": "assistant", "content": current},
                 {"role": "user", "content": request}]
        critique = await self._chat("critique", cfg.critic_role, asked, cfg.critique_max_tokens)
        results.append(critique)
        step: dict[str, Any] = {
            "round": number, "principle": principle.name, "critique_request": request,
            "critique": critique.text.strip(), "revision_request": principle.revision, "revision": None,
            "revision_raw": None, "cleaned": False, "early_stop": False,
            **call_fields("critique", critique), **call_fields("revision", None),
        }
        record["rounds"].append(step)
        if self.stop_rule is not None and self.stop_rule.search(critique.text):
            step["early_stop"] = True
            return None
        asked += [{"role": "assistant", "content": critique.text.strip()},
                  {"role": "user", "content": principle.revision}]
        revision = await self._chat("revision", cfg.revision_role or cfg.policy_role, asked, cfg.revision_max_tokens)
        results.append(revision)
        raw = revision.text.strip()
        text, cleaned = clean_revision(raw, principle.revision) if cfg.clean_revisions else (raw, False)
        step.update(revision=text, revision_raw=raw, cleaned=cleaned, **call_fields("revision", revision))
        if not text:
            raise _StepFailed("revision", EmptyResponse(
                f"round {number} ({principle.name}): the revision is empty once wrapper text is removed "
                f"({raw[:80]!r}); set sl.clean_revisions=false to keep it raw, or use a stronger model"
            ))
        return text

    async def run(self, row: PromptRow) -> dict[str, Any]:
        """The chain row for ``row``; a failed step is recorded in it (``status="error"``) with the steps
        that finished, unless the failure is worth retrying (then it is raised)."""
        cfg = self.config
        conversation = row.conversation()
        record: dict[str, Any] = {
            "id": row.id,
            "run_id": self.run_id,
            "stage": "sl",
            "status": "ok",
            "error": None,
            "error_class": None,
            "error_step": None,
            "constitution": self.constitution.name,
            "constitution_hash": self.constitution.content_hash,
            "prompt": row.prompt,
            "messages": conversation,
            "initial_response": row.response,
            "initial_source": "given" if row.response is not None else "generated",
            **call_fields("initial", None),
            "rounds": [],
            "stopped_early": False,
            "early_stop_rule": cfg.early_stop.pattern if self.stop_rule else None,
        }
        results: list[ChatResult] = []
        try:
            current = row.response
            if current is None:
                initial = await self._chat("initial", cfg.policy_role, [*self.system, *conversation], cfg.max_tokens)
                results.append(initial)
                current = initial.text.strip()
                record.update(initial_response=current, **call_fields("initial", initial))
            rng = random.Random(f"{cfg.seed}:{row.id}")
            for number, principles in enumerate(
                draw_passes(self.constitution, cfg.num_revisions, rng=rng, mode=cfg.draw), start=1
            ):
                revised = False
                for principle in principles:
                    revision_text = await self.revise_step(number, principle, conversation, current, record, results)
                    if revision_text is not None:
                        current, revised = revision_text, True
                if not revised and self.stop_rule is not None:  # no principle of the pass asked for a change
                    record["stopped_early"] = True
                    break
        except _StepFailed as failed:
            if not isinstance(failed.error, PermanentError):
                raise failed.error from None
            record.update(status="error", **error_fields(failed.error), error_step=failed.step)
        record["num_rounds"] = len(record["rounds"])
        record["final_response"] = current if record["status"] == "ok" else None
        record["prompt_tokens"] = sum(r.usage.prompt_tokens for r in results)
        record["completion_tokens"] = sum(r.usage.completion_tokens for r in results)
        record["latency_s"] = sum(r.latency_s for r in results)
        record["created_at"] = time.time()
        return record


async def run_sl(
    engine: Engine, config: SLConfig, out_dir: str | Path, *, run_id: str = "", retry_errors: bool = False
) -> SLReport:
    """Run critique → revision chains for every prompt not already in ``out_dir`` (error rows are retried when
    their class is endpoint-side, or all of them with ``retry_errors``)."""
    constitution = load_constitution(config.constitution).with_weights(config.principle_weights)
    if config.few_shot > len(constitution.few_shot):
        raise CaiError(f"sl.few_shot={config.few_shot} but constitution {constitution.name!r} has "
                       f"{len(constitution.few_shot)} few-shot examples")
    prompts = config.load(response_column=config.response_column)
    writer = ShardWriter(out_dir, shard_rows=config.shard_rows, schema=CHAIN_SCHEMA,
                         flush_every_s=config.flush_every_s)
    done, kept = finished_ids(writer, retry_errors=retry_errors)
    todo = [p for p in prompts if p.id not in done]
    report = SLReport(total=len(prompts), skipped=len(prompts) - len(todo), errors_kept=kept)
    runner = ChainRunner(engine, config, constitution, run_id or Path(out_dir).parent.name)

    def count(row: dict[str, Any]) -> None:
        if row["status"] == "ok":
            report.ok += 1
        else:
            report.errors += 1

    await write_rows(engine, todo, runner.run, writer, report, count=count,
                     concurrency=config.chain_concurrency
                     or engine.item_concurrency(config.policy_role, config.critic_role,
                                                    config.revision_role or config.policy_role))
    return report
