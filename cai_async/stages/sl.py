"""SL-CAI: prompt → initial response → (critique → revision) × N passes: one principle drawn per pass, or every
principle in priority order (``draw: all``, the method's loop).

Chains run concurrently through the engine; the steps of one chain run in order. Every step is kept in the
chain row (``CHAIN_SCHEMA``), with the quality gates' verdict on each revision (:mod:`cai_async.gates`: a
failed revision is tried once more, then the previous response is kept). Finished chains are written as
Parquet shards; a rerun skips them, and a chain cut off half-way gets its finished steps back from the engine's
cache, so no call is paid twice."""

from __future__ import annotations

import copy
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import polars as pl
from pydantic import Field, field_validator

from backends.errors import CaiError, PermanentError
from backends.strict import StrictModel
from backends.types import ChatResult
from cai_async.constitution import Constitution, DrawMode, Principle, draw_passes
from cai_async.constitution_io import load_constitution
from cai_async.engine import JUDGE, Engine
from cai_async.exports import (
    SL_COLUMNS,
    ExportConfig,
    conversations_with_response,
    count_exportable,
    write_sl_exports,
)
from cai_async.gates import GateConfig, GateTally
from cai_async.prompts import PromptRow, PromptSource, load_prompts
from cai_async.revision import NO_ISSUES_PATTERN, EmptyResponse, Reviser, RevisionSettings, StepFailed
from cai_async.stages.common import (
    CALL_FIELDS,
    MESSAGES,
    StageReport,
    call_fields,
    error_fields,
    finished_ids,
    write_rows,
)
from cai_async.stages.generate import GenerateConfig, GenerateReport, run_generate
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
    load_prompt_texts,
    resolve_path,
)
from cai_async.store import ShardWriter, iter_shards, read_shards, scan_shards

__all__ = [
    "CHAIN_SCHEMA",
    "STAGE",
    "EarlyStopConfig",
    "EmptyResponse",
    "SLConfig",
    "SLReport",
    "SLStage",
    "SLStageReport",
    "gate_summary",
    "plan_sl",
    "run_sl",
    "run_sl_stage",
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
        "gate": pl.String(),
        "gate_value": pl.Float64(),
        "gate_attempts": pl.Int64(),
        "gates_first": pl.List(pl.String()),
        "gates_retry": pl.List(pl.String()),
        "rejected": pl.List(pl.String()),
    }
)
"""One critique → revision step. ``revision`` is the revision the chain took (null: an early stop, or a revision
the gates rejected); ``revision_raw`` and the ``revision_*`` call fields are the last attempt's. Gate records:
``gate_attempts`` (revision calls: 0, 1, or 2 with the retry), ``gates_first``/``gates_retry`` (every gate the
first attempt and the retry failed; null: not checked, ``[]``: passed), ``gate``/``gate_value`` (the first gate,
in :data:`~cai_async.gates.GATES` order, that the last attempt failed, and its number: the step was rejected and
the previous response kept; null: passed), ``rejected`` (the revisions the gates rejected, in order). Rows written
before the gates have none of these fields (null when read with newer rows)."""
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
    "revisions_passed": pl.Int64(),
    "revisions_failed": pl.Int64(),
    "last_rejected": pl.String(),
    "stopped_early": pl.Boolean(),
    "early_stop_rule": pl.String(),
    "prompt_tokens": pl.Int64(),
    "completion_tokens": pl.Int64(),
    "latency_s": pl.Float64(),
    "created_at": pl.Float64(),
}
"""One row per chain; ``rounds`` holds every critique → revision step with its endpoint, usage and timing.
``revisions_passed``/``revisions_failed``: steps whose revision the chain took / the gates rejected (after the
retry); ``last_rejected``: the last rejected revision (what ``export.keep_failed_gates`` exports for a chain with
no passing revision). ``final_response`` is the last revision taken (or the initial response)."""


class EarlyStopConfig(StrictModel):
    """Stop a chain when the critique finds nothing to fix: ``pattern`` is a case-insensitive regex."""

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
    gates: GateConfig = Field(default_factory=GateConfig)
    """Revision quality gates: a revision that copies its critique, restates a request, is the text it revises,
    loops, is cut at ``revision_max_tokens`` or talks about "the last response" is tried once more, then the
    previous response is kept (README: SL-CAI, revision quality gates)."""
    clean_revisions: bool = True
    max_tokens: int = Field(default=128, ge=1)
    critique_max_tokens: int = Field(default=128, ge=1)
    revision_max_tokens: int = Field(default=128, ge=1)
    temperature: float = Field(default=0.0, ge=0)
    seed: int = 0
    policy_role: str = "policy"
    """The group that writes the initial responses."""
    critic_role: str = JUDGE
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

    def counts(self) -> dict[str, int]:
        """Chains finished ok and recorded with an error."""
        return {"ok": self.ok, "errors": self.errors}

    def failure_count(self) -> int:
        """Chains failed, recorded with an error, or kept with one from an earlier run."""
        return super().failure_count() + self.errors


@dataclass
class SLStageReport(StageResult):
    """What the sl stage did (its ``summary.json`` entry ``sl``): the chains (:class:`SLReport`), the quality
    gates' counts over them, the helpfulness responses it generated for the sft mix (when it did), the exports."""

    chains: SLReport
    gates: dict[str, Any]
    exports: dict[str, Any]
    helpful: GenerateReport | None = None

    def to_json(self) -> dict[str, Any]:
        """The chains' counts, then ``gates``, ``helpful`` (when generated) and ``exports``."""
        data = self.chains.to_json()
        data["gates"] = self.gates
        if self.helpful is not None:
            data["helpful"] = self.helpful.to_json()
        data["exports"] = self.exports
        return data

    def failure_count(self) -> int:
        """The chains' failures and the helpfulness responses'."""
        return self.chains.failure_count() + (self.helpful.failure_count() if self.helpful is not None else 0)

    def stopped_early(self) -> str | None:
        """Why the chains stopped early."""
        return self.chains.stopped_early()


class ChainRunner:
    """Runs one chain at a time for :func:`run_sl`; holds what every chain shares. The critique → revision
    steps are :class:`~cai_async.revision.Reviser`'s."""

    def __init__(self, engine: Engine, config: SLConfig, constitution: Constitution, run_id: str):
        self.config = config
        self.constitution = constitution
        self.run_id = run_id
        self.system = [{"role": "system", "content": config.system_prompt}] if config.system_prompt else []
        self.prefix = list(self.system)
        for example in constitution.few_shot[: config.few_shot]:
            self.prefix.extend(example.messages())
        self.reviser = Reviser(engine, RevisionSettings(
            critic_role=config.critic_role, revision_role=config.revision_role or config.policy_role,
            critique_max_tokens=config.critique_max_tokens, revision_max_tokens=config.revision_max_tokens,
            temperature=config.temperature, seed=config.seed, teach=config.few_shot > 0,
            clean=config.clean_revisions, stop_pattern=config.early_stop.pattern if config.early_stop.enabled else None,
            gates=config.gates,
        ), self.prefix)
        self.stop_rule = self.reviser.stop_rule

    @property
    def engine(self) -> Engine:
        """The engine the chains call (the reviser's)."""
        return self.reviser.engine

    @engine.setter
    def engine(self, engine: Engine) -> None:
        """Another engine (a Ray actor's own, :mod:`cai_async.scale`): on a reviser of this runner's own, so a
        shallow copy of the runner leaves the original's engine alone."""
        self.reviser = copy.copy(self.reviser)
        self.reviser.engine = engine

    async def revise_step(
        self, number: int, principle: Principle, conversation: list[dict[str, str]], current: str,
        record: dict[str, Any], results: list[ChatResult],
    ) -> str | None:
        """One critique → revision step under ``principle`` (see :meth:`Reviser.revise_step`)."""
        return await self.reviser.revise_step(number, principle, conversation, current, record, results)

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
                initial = await self.reviser.chat("initial", cfg.policy_role, [*self.system, *conversation],
                                                  cfg.max_tokens)
                results.append(initial)
                current = initial.text.strip()
                record.update(initial_response=current, **call_fields("initial", initial))
            rng = random.Random(f"{cfg.seed}:{row.id}")
            for number, principles in enumerate(
                draw_passes(self.constitution, cfg.num_revisions, rng=rng, mode=cfg.draw), start=1
            ):
                asked_change = False
                for principle in principles:
                    revision_text = await self.revise_step(number, principle, conversation, current, record, results)
                    if revision_text is not None:
                        current = revision_text
                    asked_change = asked_change or not record["rounds"][-1]["early_stop"]
                if not asked_change and self.stop_rule is not None:  # no principle of the pass asked for a change
                    record["stopped_early"] = True
                    break
        except StepFailed as failed:
            if not isinstance(failed.error, PermanentError):
                raise failed.error from None
            record.update(status="error", **error_fields(failed.error), error_step=failed.step)
        record["num_rounds"] = len(record["rounds"])
        record["final_response"] = current if record["status"] == "ok" else None
        record["revisions_passed"] = sum(s["revision"] is not None for s in record["rounds"])
        record["revisions_failed"] = sum(s["gate"] is not None for s in record["rounds"])
        record["last_rejected"] = next((s["rejected"][-1] for s in reversed(record["rounds"]) if s["gate"]), None)
        record["prompt_tokens"] = sum(r.usage.prompt_tokens for r in results)
        record["completion_tokens"] = sum(r.usage.completion_tokens for r in results)
        record["latency_s"] = sum(r.latency_s for r in results)
        record["created_at"] = time.time()
        return record


async def run_sl(
    engine: Engine, config: SLConfig, out_dir: str | Path, *, run_id: str = "", retry_errors: bool = False,
    executor: ItemExecutor | None = None,
) -> SLReport:
    """Run critique → revision chains for every prompt not already in ``out_dir`` (error rows are retried when
    their class is endpoint-side, or all of them with ``retry_errors``); the chains run on ``executor`` (default
    the engine)."""
    constitution = load_constitution(config.constitution).with_weights(config.principle_weights)
    if config.few_shot > len(constitution.few_shot):
        raise CaiError(f"sl.few_shot={config.few_shot} but constitution {constitution.name!r} has "
                       f"{len(constitution.few_shot)} few-shot examples")
    writer = ShardWriter(out_dir, shard_rows=config.shard_rows, schema=CHAIN_SCHEMA,
                         flush_every_s=config.flush_every_s)
    done, kept = finished_ids(writer, retry_errors=retry_errors)
    # the prompts are read twice, a row at a time, never held as a list: once to count, once to work
    total = waiting = 0
    for prompt in config.iter(response_column=config.response_column):
        total += 1
        waiting += prompt.id not in done
    todo = (p for p in config.iter(response_column=config.response_column) if p.id not in done)
    report = SLReport(total=total, skipped=total - waiting, errors_kept=kept)
    runner = ChainRunner(engine, config, constitution, run_id or Path(out_dir).parent.name)

    def count(row: dict[str, Any]) -> None:
        if row["status"] == "ok":
            report.ok += 1
        else:
            report.errors += 1

    await write_rows(engine, todo, runner.run, writer, report, count=count, total=waiting,
                     concurrency=config.chain_concurrency
                     or engine.item_concurrency(config.policy_role, config.critic_role,
                                                    config.revision_role or config.policy_role),
                     executor=executor)
    return report


async def run_sl_stage(
    engine: Engine, config: SLConfig, run_dir: Path, *, retry_errors: bool = False,
    executor: ItemExecutor | None = None,
) -> SLStageReport:
    """Chains into ``sl/``, helpfulness responses into ``helpful/`` when the mix needs them, then exports; the
    items run on ``executor`` (default the engine)."""
    chain_report = await run_sl(engine, config, run_dir / "sl", run_id=run_dir.name, retry_errors=retry_errors,
                                executor=executor)
    helpful = config.export.helpful
    helpful_rows = None
    generated: GenerateReport | None = None
    gates = gate_summary(run_dir / "sl")
    chains = scan_shards(run_dir / "sl", columns=SL_COLUMNS)  # streamed into the exports, never all in memory
    if helpful is not None:
        finished = 0 if chains is None else count_exportable(chains, config.export)
        needed = max(1, math.ceil(helpful.ratio / (1 - helpful.ratio) * finished))
        limit = min(helpful.limit or needed, needed)
        if helpful.response_column is None:
            generated = await run_generate(engine, GenerateConfig(
                input=helpful.input, prompt_column=helpful.prompt_column, id_column=helpful.id_column,
                limit=limit, max_tokens=helpful.max_tokens, seed=config.seed, role=config.policy_role,
            ), run_dir / "helpful", executor=executor)
            frame = read_shards(run_dir / "helpful")
        else:
            rows = load_prompts(helpful.input, column=helpful.prompt_column, id_column=helpful.id_column,
                                response_column=helpful.response_column)[:limit]
            frame = pl.DataFrame([{"id": r.id, "messages": r.conversation(), "response": r.response} for r in rows])
        helpful_rows = conversations_with_response(frame)
    exports = write_sl_exports(run_dir, chains, config.export, helpful_rows)
    return SLStageReport(chains=chain_report, gates=gates, exports=exports, helpful=generated)


def gate_summary(directory: str | Path) -> dict[str, Any]:
    """The quality gates' counts over a stage's chains (:meth:`GateTally.as_dict`), read a shard at a time with
    only the columns they need."""
    tally = GateTally()
    for part in iter_shards(directory, columns=["id", "rounds", "revisions_passed", "revisions_failed"]):
        tally.update(part.iter_rows(named=True))
    return tally.as_dict()


def _steps_per_pass(constitution: Constitution, draw: str | None) -> float:
    """Expected critique → revision steps in one pass: 1, or with ``draw: all`` the enabled principles, each
    counted by its chance of being applied (weight ÷ the heaviest)."""
    if (draw or constitution.draw) != "all":
        return 1.0
    weights: list[float] = [p.weight for p in constitution.principles if p.weight > 0]
    return sum(w / max(weights) for w in weights)


def plan_sl(config: SLConfig, count: Count) -> list[StagePlan]:
    """Estimated calls of the SL-CAI stage: initial responses, critiques, revisions, the helpfulness mix."""
    sl = config
    prompts = load_prompt_texts(sl)
    constitution = load_constitution(sl.constitution).with_weights(sl.principle_weights)
    request = max((len(p.critique_request(teach=sl.few_shot > 0)) + len(p.revision)) // 4
                  for p in constitution.principles)
    steps = _steps_per_pass(constitution, sl.draw)
    policy = StagePlan("sl", sl.policy_role, rounds=1 if sl.response_column is None else 0)
    critic = StagePlan("sl", sl.critic_role, rounds=2 * sl.num_revisions * max(1, round(steps)))
    revision_role = sl.revision_role or sl.policy_role
    reviser = policy if revision_role == sl.policy_role else StagePlan("sl", revision_role)
    for text in prompts:
        base = count(text)
        if sl.response_column is None:
            policy.add(1, base, sl.max_tokens)
        calls = round(sl.num_revisions * steps)
        context = base + sl.max_tokens + request
        critic.add(calls, calls * context, calls * sl.critique_max_tokens)
        reviser.add(calls, calls * (context + sl.critique_max_tokens + request), calls * sl.revision_max_tokens)
    policy.notes.append(f"{len(prompts)} prompts; every round assumed to run (early stop only saves)")
    if sl.gates.enabled and sl.gates.retry:
        reviser.notes.append("not counted: a revision that fails a quality gate is asked once more (at most one "
                             "more revision call per step)")
    if steps != 1:
        critic.notes.append(f"{steps:g} principles per pass on average (draw: all)")
    if sl.export.helpful is not None:
        share = sl.export.helpful.ratio
        needed = math.ceil(share / (1 - share) * len(prompts)) if share else 0
        policy.add(needed, needed * 40, needed * sl.export.helpful.max_tokens)
        policy.notes.append(f"{needed} helpfulness answers for the sft mix")
    return [policy, critic] if reviser is policy else [policy, critic, reviser]


class SLStage(StageUnit[SLConfig]):
    """The SL-CAI stage (recipe key ``sl``, command ``cai sl``)."""

    name = "sl"
    config_type = SLConfig
    exports = ("sft", "pairs")
    command = StageCommand(
        name="sl",
        help="SL-CAI: initial response → critique → revision chains, then sft/pairs exports (defaults → RECIPE → "
             "flags).",
        flags=(
            StageFlag(name="input", key="sl.input"),
            StageFlag(name="prompt_column", key="sl.prompt_column", help="Column with the prompt or conversation."),
            StageFlag(name="response_column", key="sl.response_column",
                      help="Take initial responses from this column."),
            StageFlag(name="constitution", key="sl.constitution", help="Built-in name or constitution file."),
            StageFlag(name="num_revisions", key="sl.num_revisions", type=int,
                      help="Critique → revision rounds per prompt."),
            StageFlag(name="retry_errors", key="retry_errors", type=bool),
            StageFlag(name="limit", key="sl.limit", type=int),
        ),
    )

    def roles(self, config: SLConfig) -> set[str]:
        """Policy, critic and reviser."""
        return {config.policy_role, config.critic_role, config.revision_role or ""}

    async def run(self, context: StageContext, config: SLConfig, entry: str) -> SLStageReport:
        """See :func:`run_sl_stage`."""
        return await run_sl_stage(context.require_engine(), config, context.run_dir,
                                  retry_errors=context.retry_errors, executor=context.executor)

    def plan(self, recipe: RecipeView, count: Count) -> list[StagePlan]:
        """See :func:`plan_sl`."""
        config = self.config(recipe)
        return plan_sl(config, count) if config is not None else []

    def resolve(self, config: SLConfig, base: Path) -> None:
        """The prompt file, the constitution, the helpfulness mix's prompts."""
        config.input = resolve_path(base, config.input)
        config.constitution = resolve_path(base, config.constitution)
        if config.export.helpful is not None:
            config.export.helpful.input = resolve_path(base, config.export.helpful.input)

    def missing(self, config: SLConfig | None, source: str) -> str | None:
        """Prompts to run chains on."""
        return None if config is not None and config.input else (
            "no prompts: pass --input FILE or set sl.input in the recipe")


STAGE = SLStage()
"""The registered unit."""
