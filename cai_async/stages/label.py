"""AI-feedback preference labels (RL-CAI): each pair is put to the ``judge`` group as a multiple-choice
question per comparison principle, P(A) and P(B) are read from the backend's choice scoring (logprobs or
logits; sampling where an endpoint has none, said in the row), both orders are scored and averaged
(position swap), and M principles are ensembled. In chain-of-thought mode the judge reasons first; its
parsed answer becomes a probability clamped to a band, and an unparseable answer is an abstention."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import polars as pl
from pydantic import Field, ValidationInfo, model_validator

from backends.deprecation import renamed_keys
from backends.errors import CaiError, PermanentError
from backends.strict import StrictModel
from cai_async.constitution import ComparisonPrinciple, ComparisonSet, draw_principles
from cai_async.constitution_io import load_comparison_set
from cai_async.engine import JUDGE, Engine
from cai_async.judging import ANSWER_PREFIX, CotConfig, Judgment, combine_orders, judge_pair
from cai_async.stages.common import StageReport, error_fields, finished_ids, gather_calls, write_rows
from cai_async.stages.pairs import PairRow
from cai_async.stages.unit import ItemExecutor
from cai_async.store import MESSAGES, ShardWriter

__all__ = [
    "LABEL_SCHEMA",
    "LabelConfig",
    "LabelReport",
    "Labeller",
    "abstention_reason",
    "dropped_pairs",
    "label_pairs",
    "run_label",
]

JUDGMENT = pl.Struct({
    "principle": pl.String(),
    "order": pl.String(),
    "p_a": pl.Float64(),
    "p_first": pl.Float64(),
    "method": pl.String(),
    "abstained": pl.Boolean(),
    "reasoning": pl.String(),
    "endpoint": pl.String(),
    "model": pl.String(),
    "cached": pl.Boolean(),
    "latency_s": pl.Float64(),
    "prompt_tokens": pl.Int64(),
    "completion_tokens": pl.Int64(),
})
PRINCIPLE_LABEL = pl.Struct({"name": pl.String(), "p_a": pl.Float64(), "consistent": pl.Boolean()})
LABEL_SCHEMA: dict[str, pl.DataType] = {
    "id": pl.String(),
    "run_id": pl.String(),
    "stage": pl.String(),
    "status": pl.String(),
    "error": pl.String(),
    "error_class": pl.String(),
    "comparison_set": pl.String(),
    "comparison_hash": pl.String(),
    "prompt_id": pl.String(),
    "pair_source": pl.String(),
    "prompt": pl.String(),
    "messages": MESSAGES,
    "response_a": pl.String(),
    "response_b": pl.String(),
    "human_preferred": pl.String(),
    "judgments": pl.List(JUDGMENT),
    "principles": pl.List(PRINCIPLE_LABEL),
    "p_a": pl.Float64(),
    "consistency": pl.Float64(),
    "abstained": pl.Boolean(),
    "chosen": pl.String(),
    "rejected": pl.String(),
    "chosen_position": pl.String(),
    "confidence": pl.Float64(),
    "methods": pl.String(),
    "prompt_tokens": pl.Int64(),
    "completion_tokens": pl.Int64(),
    "created_at": pl.Float64(),
}
"""One row per pair: every judgment (principle × order), each principle's swap-averaged P(A better), the
ensemble mean, position consistency, and the chosen/rejected responses with their confidence."""

class LabelConfig(StrictModel):
    """Options of the feedback labeller (recipe key ``label.label``)."""

    principles: str = "harmless"
    """A built-in comparison set (``harmless``, ``helpful-harmless``) or a YAML/JSON/TOML file."""
    principle_weights: dict[str, float] = Field(default_factory=dict)
    ensemble: int = Field(default=2, ge=1)
    """Principles drawn (by weight, without repeats) per pair."""
    swap: bool = True
    cot: CotConfig = Field(default_factory=CotConfig)
    answer_prefix: str = ANSWER_PREFIX
    """Where the backend can continue an assistant turn (llama.cpp in-process; ``prefill`` endpoints)."""
    judge_role: str = JUDGE
    """The group that judges the pairs (``critic_role``: its old name, still read with one line)."""
    seed: int = 0
    shard_rows: int = Field(default=64, ge=1)
    flush_every_s: float = Field(default=10.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data: Any, info: ValidationInfo) -> Any:
        return renamed_keys(data, {"critic_role": "judge_role"}, where="label.label", context=info.context)


@dataclass
class LabelReport(StageReport):
    """What a labelling run did: pairs labelled, abstained (no principle gave a usable answer) and recorded as
    errors; ``failed`` pairs were not recorded and a rerun retries them."""

    labelled: int = 0
    abstained: int = 0
    errors: int = 0

    def counts(self) -> dict[str, int]:
        """Pairs labelled, abstained and recorded with an error."""
        return {"labelled": self.labelled, "abstained": self.abstained, "errors": self.errors}

    def failure_count(self) -> int:
        """Pairs failed, recorded with an error, or kept with one from an earlier run."""
        return super().failure_count() + self.errors


class Labeller:
    """Labels pairs one at a time (through :meth:`label`); holds what every pair shares."""

    def __init__(self, engine: Engine, config: LabelConfig, run_id: str = ""):
        self.engine = engine
        self.config = config
        self.principles: ComparisonSet = load_comparison_set(config.principles).with_weights(config.principle_weights)
        self.run_id = run_id

    async def _judge(self, pair: PairRow, principle: ComparisonPrinciple, order: str) -> Judgment:
        cfg = self.config
        return await judge_pair(self.engine, cfg.judge_role, pair.messages, principle, pair.response_a,
                                pair.response_b, order, cot=cfg.cot, answer_prefix=cfg.answer_prefix, seed=cfg.seed)

    def _base(self, pair: PairRow) -> dict[str, Any]:
        return {
            "id": pair.id, "run_id": self.run_id, "stage": "rl", "status": "ok", "error": None, "error_class": None,
            "comparison_set": self.principles.name, "comparison_hash": self.principles.content_hash,
            "prompt_id": pair.prompt_id, "pair_source": pair.source, "prompt": pair.prompt,
            "messages": list(pair.messages), "response_a": pair.response_a, "response_b": pair.response_b,
            "human_preferred": pair.human_preferred,
        }

    async def label(self, pair: PairRow) -> dict[str, Any]:
        """The label row of ``pair``; a permanent failure is recorded in it, a transient one is raised."""
        cfg = self.config
        record = self._base(pair)
        rng = random.Random(f"{cfg.seed}:{pair.id}")
        drawn = draw_principles(self.principles, min(cfg.ensemble, len(self.principles.principles)), rng=rng,
                                mode="weighted" if self.principles.draw != "priority" else "priority")
        slots = [(principle, order) for principle in drawn for order in (("AB", "BA") if cfg.swap else ("AB",))]
        outcomes = await gather_calls([partial(self._judge, pair, *slot) for slot in slots],
                                      together=self.engine.item_concurrency(cfg.judge_role) > 1)
        errors = [o for o in outcomes if isinstance(o, CaiError)]
        for error in errors:
            if not isinstance(error, PermanentError):
                raise error  # transient or budget: not recorded, so a rerun retries the pair
        if errors:
            record.update(status="error", **error_fields(errors[0]))
        judgments = [o for o in outcomes if isinstance(o, Judgment)]
        per_principle = []
        for principle in drawn:
            by_order = {j.order: j.p_a for j in judgments if j.principle == principle.name}
            p_a, consistent = combine_orders(by_order.get("AB"), by_order.get("BA"))
            per_principle.append({"name": principle.name, "p_a": p_a, "consistent": consistent})
        usable = [p["p_a"] for p in per_principle if p["p_a"] is not None]
        checked = [p["consistent"] for p in per_principle if p["consistent"] is not None]
        p_a = sum(usable) / len(usable) if usable and record["status"] == "ok" else None
        prefers_a = p_a is not None and p_a > 0.5
        decided = p_a is not None and p_a != 0.5
        record.update(
            judgments=[j.record() for j in judgments],
            principles=per_principle,
            p_a=p_a,
            consistency=sum(checked) / len(checked) if checked else None,
            abstained=p_a is None and record["status"] == "ok",
            chosen=(pair.response_a if prefers_a else pair.response_b) if decided else None,
            rejected=(pair.response_b if prefers_a else pair.response_a) if decided else None,
            chosen_position=("A" if prefers_a else "B") if decided else None,
            confidence=max(p_a, 1.0 - p_a) if p_a is not None else None,
            methods=",".join(sorted({j.method for j in judgments})),
            prompt_tokens=sum(j.result.usage.prompt_tokens for j in judgments if j.result),
            completion_tokens=sum(j.result.usage.completion_tokens for j in judgments if j.result),
            created_at=time.time(),
        )
        return record


def abstention_reason(config: LabelConfig, *, sampled: bool) -> str:
    """Why the judge's answers named no choice, and what to do, for the line that counts the pairs an export
    lost to abstentions. ``sampled``: the judge's endpoints sample answers (``score_fallback: sample``)."""
    if config.cot.enabled:
        return ("the judge's reasoned answer named no choice (cot); raise label.label.cot.max_tokens so it reaches "
                "its answer, or use a bigger judge")
    if sampled:
        return ("the judge's sampled answer named no choice (score_fallback: sample); use an endpoint with "
                "logprobs or a bigger judge")
    return ("no choice was among the judge's top logprobs; raise the endpoint's top_logprobs, check "
            "label.label.answer_prefix, or use a bigger judge")


def dropped_pairs(labels_dir: str | Path, *, min_confidence: float = 0.5) -> dict[str, int]:
    """Label rows of ``labels_dir`` (each pair's latest) and how many of them the dpo/reward exports leave out,
    by cause: ``abstained`` (no principle's answer named a choice), ``ties`` (P(A) exactly 0.5), ``unsure``
    (decided, below ``min_confidence``), ``errors`` (recorded errors)."""
    from cai_async.store import scan_shards

    frame = scan_shards(labels_dir, columns=("id", "status", "abstained", "chosen", "confidence"))
    if frame is None:
        return {"pairs": 0, "abstained": 0, "ties": 0, "unsure": 0, "errors": 0}
    ok = pl.col("status") == "ok"
    abstained = ok & pl.col("abstained").fill_null(False)
    tie = ok & ~pl.col("abstained").fill_null(False) & pl.col("chosen").is_null()
    unsure = ok & pl.col("chosen").is_not_null() & (pl.col("confidence") < min_confidence)
    counts = frame.select(
        pl.len().alias("pairs"), abstained.sum().alias("abstained"), tie.sum().alias("ties"),
        unsure.sum().alias("unsure"), (~ok).sum().alias("errors"),
    ).collect().row(0, named=True)
    return {key: int(value or 0) for key, value in counts.items()}


async def run_label(
    engine: Engine, config: LabelConfig, pairs: list[PairRow], out_dir: str | Path, *, run_id: str = ""
) -> LabelReport:
    """Label every pair not already in ``out_dir``; rows are written as they finish."""
    labeller = Labeller(engine, config, run_id or Path(out_dir).parent.name)
    return await label_pairs(labeller, pairs, out_dir)


async def label_pairs(
    labeller: Labeller, pairs: list[PairRow], out_dir: str | Path, *, retry_errors: bool = False,
    executor: ItemExecutor | None = None,
) -> LabelReport:
    """Label ``pairs`` with a ready :class:`Labeller` (built first, so a bad comparison set fails before any
    pair is made); error rows are retried as :func:`~cai_async.stages.common.finished_ids` says. The pairs are
    labelled on ``executor`` (default the labeller's engine)."""
    engine, config = labeller.engine, labeller.config
    writer = ShardWriter(out_dir, shard_rows=config.shard_rows, schema=LABEL_SCHEMA, flush_every_s=config.flush_every_s)
    done, kept = finished_ids(writer, retry_errors=retry_errors)
    todo = [p for p in pairs if p.id not in done]
    report = LabelReport(total=len(pairs), skipped=len(pairs) - len(todo), errors_kept=kept)

    def count(row: dict[str, Any]) -> None:
        if row["status"] != "ok":
            report.errors += 1
        elif row["abstained"]:
            report.abstained += 1
        else:
            report.labelled += 1

    await write_rows(engine, todo, labeller.label, writer, report, count=count,
                     concurrency=engine.item_concurrency(config.judge_role), executor=executor)
    return report

