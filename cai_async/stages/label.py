"""AI-feedback preference labels (RL-CAI): each pair is put to the ``critic`` group as a multiple-choice
question per comparison principle, P(A) and P(B) are read from the backend's choice scoring (logprobs or
logits; sampling where an endpoint has none, said in the row), both orders are scored and averaged
(position swap), and M principles are ensembled. In chain-of-thought mode the critic reasons first; its
parsed answer becomes a probability clamped to a band, and an unparseable answer is an abstention."""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import polars as pl
from pydantic import BaseModel, ConfigDict, Field, model_validator

from backends.errors import CaiError, NoChoiceFound, PermanentError
from backends.types import ChatRequest, ChatResult, ScoreRequest, ScoreResult
from cai_async.constitution import ComparisonPrinciple, ComparisonSet, draw_principles
from cai_async.constitution_io import load_comparison_set
from cai_async.engine import Engine
from cai_async.stages.common import StageReport, error_fields, finished_ids, gather_calls, write_rows
from cai_async.stages.pairs import PairRow
from cai_async.store import MESSAGES, ShardWriter

__all__ = [
    "LABEL_SCHEMA",
    "CotConfig",
    "LabelConfig",
    "LabelReport",
    "Labeller",
    "combine_orders",
    "label_pairs",
    "multiple_choice_prompt",
    "parse_choice",
    "run_label",
    "single_response_prompt",
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

_INSTRUCTION = "Answer with (A) or (B) only."
_COT_INSTRUCTION = (
    "First, think step by step about both responses. Then finish with exactly one line: "
    '"The answer is (A)" or "The answer is (B)".'
)


class CotConfig(BaseModel):
    """Chain-of-thought labels: the critic reasons, then answers; the answer is clamped to ``band``."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    band: tuple[float, float] = (0.4, 0.6)
    max_tokens: int = Field(default=256, ge=16)
    temperature: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _band(self) -> CotConfig:
        low, high = self.band
        if not 0.0 <= low <= 0.5 <= high <= 1.0:
            raise ValueError("band must satisfy 0 <= low <= 0.5 <= high <= 1, e.g. [0.4, 0.6]")
        return self


class LabelConfig(BaseModel):
    """Options of the feedback labeller (recipe key ``rl.label``)."""

    model_config = ConfigDict(extra="forbid")

    principles: str = "harmless"
    """A built-in comparison set (``harmless``, ``helpful-harmless``) or a YAML/JSON/TOML file."""
    principle_weights: dict[str, float] = Field(default_factory=dict)
    ensemble: int = Field(default=2, ge=1)
    """Principles drawn (by weight, without repeats) per pair."""
    swap: bool = True
    cot: CotConfig = Field(default_factory=CotConfig)
    answer_prefix: str = "The answer is ("
    """Where the backend can continue an assistant turn (llama.cpp in-process; ``prefill`` endpoints)."""
    critic_role: str = "critic"
    seed: int = 0
    shard_rows: int = Field(default=64, ge=1)
    flush_every_s: float = Field(default=10.0, gt=0)


@dataclass
class LabelReport(StageReport):
    """What a labelling run did: pairs labelled, abstained (no principle gave a usable answer) and recorded as
    errors; ``failed`` pairs were not recorded and a rerun retries them."""

    labelled: int = 0
    abstained: int = 0
    errors: int = 0


def _transcript(messages: tuple[dict[str, str], ...] | list[dict[str, str]]) -> str:
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "\n\n".join(f"{names.get(m['role'], m['role'])}: {m['content']}" for m in messages)


def multiple_choice_prompt(
    messages: tuple[dict[str, str], ...] | list[dict[str, str]], question: str, first: str, second: str,
    *, cot: bool = False,
) -> str:
    """The paper's feedback prompt: the conversation, the principle's question, options (A) and (B)."""
    return (
        f"Consider the following conversation between a human and an assistant:\n\n{_transcript(messages)}\n\n"
        f"{question}\n\nOptions:\n(A) {first}\n\n(B) {second}\n\n{_COT_INSTRUCTION if cot else _INSTRUCTION}"
    )


def _text(value: Any) -> str:
    return _transcript(value) if isinstance(value, list) else str(value)


def single_response_prompt(prompt: Any, completion: Any, question: str) -> str:
    """The feedback prompt for one response."""
    return (
        f"Consider the following conversation between a human and an assistant:\n\n{_text(prompt)}\n\n"
        f"Assistant's response:\n{_text(completion)}\n\nPrinciple: {question}\n\n"
        "Judged by this principle, is the assistant's response a good one?\n(A) Yes\n(B) No\n"
        "Answer with (A) or (B) only."
    )


_FINAL = re.compile(r"answer\s+is\s*:?\s*\(?\s*([AB])\b", re.IGNORECASE)
_MENTION = re.compile(r"\(([AB])\)|\b(?:option|response)\s+\(?([AB])\b", re.IGNORECASE)


def parse_choice(text: str) -> str | None:
    """The choice a chain-of-thought answer ends on, or ``None`` when it cannot be told (an abstention).

    The last "the answer is (X)" wins; failing that, the options named in the last paragraph, if they are
    all the same one."""
    finals = _FINAL.findall(text)
    if finals:
        return str(finals[-1]).upper()
    tail = text.strip().split("\n\n")[-1] if text.strip() else ""
    named = {(a or b).upper() for a, b in _MENTION.findall(tail)}
    return named.pop() if len(named) == 1 else None


def combine_orders(p_ab: float | None, p_ba: float | None) -> tuple[float | None, bool | None]:
    """Swap-average: P(A better) from the (A, B) order and, re-mapped, from the (B, A) order; and whether the
    preferred response survived the swap (``None`` when either order abstained or is missing)."""
    scores = [p for p in (p_ab, p_ba) if p is not None]
    if not scores:
        return None, None
    mean = sum(scores) / len(scores)
    if p_ab is None or p_ba is None:
        return mean, None
    return mean, (p_ab > 0.5) == (p_ba > 0.5) and p_ab != 0.5


@dataclass
class _Judgment:
    principle: str
    order: str
    p_a: float | None
    p_first: float | None
    method: str
    reasoning: str | None
    result: ChatResult | ScoreResult | None

    def record(self) -> dict[str, Any]:
        r = self.result
        return {
            "principle": self.principle, "order": self.order, "p_a": self.p_a, "p_first": self.p_first,
            "method": self.method, "abstained": self.p_a is None, "reasoning": self.reasoning,
            "endpoint": r.endpoint if r else None, "model": r.model if r else None, "cached": r.cached if r else None,
            "latency_s": r.latency_s if r else None, "prompt_tokens": r.usage.prompt_tokens if r else 0,
            "completion_tokens": r.usage.completion_tokens if r else 0,
        }


class Labeller:
    """Labels pairs one at a time (through :meth:`label`); holds what every pair shares."""

    def __init__(self, engine: Engine, config: LabelConfig, run_id: str = ""):
        self.engine = engine
        self.config = config
        self.principles: ComparisonSet = load_comparison_set(config.principles).with_weights(config.principle_weights)
        self.run_id = run_id

    async def _judge(self, pair: PairRow, principle: ComparisonPrinciple, order: str) -> _Judgment:
        cfg = self.config
        first, second = (pair.response_a, pair.response_b) if order == "AB" else (pair.response_b, pair.response_a)
        prompt = multiple_choice_prompt(pair.messages, principle.question, first, second, cot=cfg.cot.enabled)
        messages = [{"role": "user", "content": prompt}]
        if cfg.cot.enabled:
            chat = await self.engine.chat(cfg.critic_role, ChatRequest(
                messages, max_tokens=cfg.cot.max_tokens, temperature=cfg.cot.temperature, seed=cfg.seed))
            choice = parse_choice(chat.text)
            low, high = cfg.cot.band
            p_first = None if choice is None else (high if choice == "A" else low)
            p_a = p_first if order == "AB" or p_first is None else 1.0 - p_first
            return _Judgment(principle.name, order, p_a, p_first, "cot", chat.text, chat)
        try:
            scored = await self.engine.score(cfg.critic_role, ScoreRequest(
                messages, choices=("A", "B"), answer_prefix=cfg.answer_prefix))
        except NoChoiceFound as exc:
            return _Judgment(principle.name, order, None, None, "abstained", str(exc), None)
        p_first = scored.probs["A"]
        return _Judgment(principle.name, order, p_first if order == "AB" else 1.0 - p_first, p_first,
                         scored.method, None, scored)

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
                                      together=self.engine.item_concurrency(cfg.critic_role) > 1)
        errors = [o for o in outcomes if isinstance(o, CaiError)]
        for error in errors:
            if not isinstance(error, PermanentError):
                raise error  # transient or budget: not recorded, so a rerun retries the pair
        if errors:
            record.update(status="error", **error_fields(errors[0]))
        judgments = [o for o in outcomes if isinstance(o, _Judgment)]
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


async def run_label(
    engine: Engine, config: LabelConfig, pairs: list[PairRow], out_dir: str | Path, *, run_id: str = ""
) -> LabelReport:
    """Label every pair not already in ``out_dir``; rows are written as they finish."""
    labeller = Labeller(engine, config, run_id or Path(out_dir).parent.name)
    return await label_pairs(labeller, pairs, out_dir)


async def label_pairs(
    labeller: Labeller, pairs: list[PairRow], out_dir: str | Path, *, retry_errors: bool = False
) -> LabelReport:
    """Label ``pairs`` with a ready :class:`Labeller` (built first, so a bad comparison set fails before any
    pair is made); error rows are retried as :func:`~cai_async.stages.common.finished_ids` says."""
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
                     concurrency=engine.item_concurrency(config.critic_role))
    return report

