"""The guard: a cascade of tiers, cheapest first, checks a request or an answer against the constitution's
principles and returns a :class:`Verdict` — rules (patterns and words the principles carry) decide when they
match; then the classifier trained from the constitution's own data (``cai train guard``) decides when its
score is confidently high or low; then an external Llama-Guard-style model, when configured; otherwise the
constitutional judge (the ``critic`` group, scored from choice probabilities exactly as the labeller scores)
decides. Answers that violate a principle can be blocked, flagged or revised by the
constitution's own critique → revision. Every call goes through the engine: limits, retries, cache, costs."""

from __future__ import annotations

import hashlib
import json
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anyio
import polars as pl

from backends.errors import CaiError, ConfigError
from cai_async.constitution import ComparisonSet, Constitution, draw_principles
from cai_async.constitution_io import load_comparison_set, load_constitution
from cai_async.engine import Engine
from cai_async.guard.audit import AUDITS
from cai_async.guard.classifier import GuardClassifier, ScoreBatcher
from cai_async.guard.config import DirectionPolicy, GuardConfig
from cai_async.guard.external import ask_external_guard
from cai_async.guard.training_data import exchange_text
from cai_async.judging import score_request, score_response
from cai_async.store import ShardWriter

__all__ = [
    "AUDIT_TEXT_SCHEMA",
    "VERDICT_SCHEMA",
    "Guard",
    "GuardPrinciple",
    "PrincipleScore",
    "TierReadings",
    "Verdict",
    "VerdictLog",
    "guard_principles",
]

Direction = Literal["input", "output"]
Decision = Literal["allow", "flag", "block", "revise"]


@dataclass(frozen=True, slots=True)
class GuardPrinciple:
    """A principle as the guard checks it: its name, the question the judge is asked, its weight and rules."""

    name: str
    question: str
    weight: float
    rules: Any = None


@dataclass(frozen=True, slots=True)
class PrincipleScore:
    """How likely a principle is violated (0–1), and what said so."""

    name: str
    score: float
    evidence: str = ""


@dataclass(slots=True)
class Verdict:
    """The guard's decision on one request or answer: ``allow``, ``flag``, ``block`` or ``revise`` (the answer
    was rewritten: ``revised``), the violated principles with their scores, the tier that decided, timing."""

    decision: Decision
    direction: Direction
    tier: str
    """rules | classifier | external | judge | audit-allow | audit-block | audit-unsure (the judge decided a
    check picked for the classifier's audit; the suffix is what the classifier would have done) | fail-open |
    fail-closed | off"""
    violated: list[PrincipleScore] = field(default_factory=list)
    scores: list[PrincipleScore] = field(default_factory=list)
    latency_s: float = 0.0
    judge_calls: int = 0
    revised: str | None = None
    error: str | None = None
    classifier_score: float | None = None
    """The classifier tier's P(violation), when it was asked (also when it passed the check on)."""

    @property
    def blocked(self) -> bool:
        return self.decision == "block"

    def refusal(self) -> str:
        """A plain-words refusal that names the principles (what a blocked request or answer is replaced by)."""
        names = ", ".join(p.name for p in self.violated) or "the guard's principles"
        what = "this request" if self.direction == "input" else "that answer"
        return f"I can't help with {what}: it goes against the principle of {names}."

    def as_dict(self) -> dict[str, Any]:
        return {"decision": self.decision, "direction": self.direction, "tier": self.tier,
                "violated": [p.name for p in self.violated],
                "scores": {p.name: round(p.score, 4) for p in self.scores}, "latency_s": round(self.latency_s, 4)}


def _conversation_text(messages: Sequence[dict[str, Any]]) -> str:
    return "\n\n".join(f"{str(m.get('role', 'user')).capitalize()}: {m.get('content') or ''}" for m in messages)


def guard_principles(source: str) -> list[GuardPrinciple]:
    """The principles of a comparison set (their questions) or of a constitution (their critique requests)."""
    loaded: ComparisonSet | Constitution
    try:
        loaded = load_comparison_set(source)
    except ConfigError:
        loaded = load_constitution(source)
    if isinstance(loaded, ComparisonSet):
        return [GuardPrinciple(p.name, p.question, p.weight, p.rules) for p in loaded.principles if p.weight > 0]
    return [GuardPrinciple(p.name, p.critique, p.weight, p.rules) for p in loaded.principles if p.weight > 0]


VERDICT_SCHEMA: dict[str, pl.DataType] = {
    "id": pl.String(),
    "request_hash": pl.String(),
    "direction": pl.String(),
    "decision": pl.String(),
    "tier": pl.String(),
    "violated": pl.List(pl.String()),
    "scores": pl.List(pl.Struct({"name": pl.String(), "score": pl.Float64()})),
    "judge_calls": pl.Int64(),
    "classifier_score": pl.Float64(),
    "latency_s": pl.Float64(),
    "error": pl.String(),
    "created_at": pl.Float64(),
}
"""One row per verdict: which request (by hash, never its text or headers), what was decided, by which tier,
each principle's score and the time it took."""


AUDIT_TEXT_SCHEMA: dict[str, pl.DataType] = {
    "id": pl.String(),
    "request_hash": pl.String(),
    "direction": pl.String(),
    "text": pl.String(),
    "violated": pl.Boolean(),
    "created_at": pl.Float64(),
}
"""One row per audited check whose text is kept (``guard.classifier.keep_text``): the text the classifier reads
and whether the judge found a violation."""


class VerdictLog:
    """Verdicts written as Parquet shards under ``RUN_DIR/guard/verdicts`` (flushed every few seconds), and the
    text of audited checks under ``RUN_DIR/guard/audits`` when it is kept."""

    def __init__(self, run_dir: str | Path, *, flush_every_s: float = 5.0) -> None:
        self.writer = ShardWriter(Path(run_dir) / "guard" / "verdicts", shard_rows=512, schema=VERDICT_SCHEMA,
                                  flush_every_s=flush_every_s)
        self.run_dir, self.flush_every_s = Path(run_dir), flush_every_s
        self.texts: ShardWriter | None = None

    def add(self, verdict: Verdict, messages: Sequence[dict[str, Any]], answer: str | None, *,
            keep_text: bool = False) -> None:
        digest = hashlib.sha256(json.dumps([list(messages), answer], sort_keys=True, default=str).encode())
        row = {"id": uuid.uuid4().hex, "request_hash": digest.hexdigest()[:16], "direction": verdict.direction,
               "created_at": time.time()}
        self.writer.add({
            **row, "decision": verdict.decision, "tier": verdict.tier, "violated": [p.name for p in verdict.violated],
            "scores": [{"name": p.name, "score": p.score} for p in verdict.scores], "judge_calls": verdict.judge_calls,
            "classifier_score": verdict.classifier_score, "latency_s": verdict.latency_s, "error": verdict.error,
        })
        if keep_text:
            if self.texts is None:
                self.texts = ShardWriter(self.run_dir / "guard" / "audits", shard_rows=512, schema=AUDIT_TEXT_SCHEMA,
                                         flush_every_s=self.flush_every_s)
            self.texts.add({**row, "text": exchange_text(messages, answer), "violated": bool(verdict.violated)})

    def flush(self) -> None:
        self.writer.flush()
        if self.texts is not None:
            self.texts.flush()


@dataclass(frozen=True, slots=True)
class TierReadings:
    """What each tier says of one text on its own: a rule matched; the classifier's score (None: no
    classifier); the external guard blocks (None: none configured or no answer); the judge finds a violation
    (None: it failed), and its highest P(violation)."""

    rules: bool
    classifier: float | None
    external: bool | None
    judge: bool | None
    judge_score: float | None


class Guard:
    """Checks requests and answers against the constitution on ``engine`` (see the module docstring)."""

    def __init__(self, engine: Engine, config: GuardConfig, *, log: VerdictLog | None = None) -> None:
        self.engine = engine
        self.config = config
        self.principles = guard_principles(config.principles)
        self.by_name = {p.name: p for p in self.principles}
        self._set = ComparisonSet.model_validate({"name": "guard", "principles": [
            {"name": p.name, "question": p.question, "weight": p.weight} for p in self.principles]})
        self.constitution = load_constitution(config.constitution)
        self.log = log
        engine.group(config.judge_role)  # a missing judge group is a clear error before any traffic
        self.classifier: GuardClassifier | None = None
        if config.classifier is not None:
            self.classifier = GuardClassifier.load(config.classifier.path, lo=config.classifier.lo,
                                                   hi=config.classifier.hi, threads=config.classifier.threads)
            self._batcher = ScoreBatcher(self.classifier.score)  # concurrent checks share forward passes
        if config.external is not None:
            engine.group(config.external.role)

    def _policy(self, direction: Direction) -> DirectionPolicy:
        return self.config.input if direction == "input" else self.config.output

    async def check_input(self, messages: Sequence[dict[str, Any]]) -> Verdict:
        """Whether a request may go to the model."""
        return await self._check("input", messages, None)

    async def check_output(self, messages: Sequence[dict[str, Any]], answer: str, *,
                           final: bool = True) -> Verdict:
        """Whether an answer may go to the client; with the ``revise`` action (and ``final``), a violating
        answer is rewritten and returned in ``Verdict.revised``."""
        return await self._check("output", messages, answer, final=final)

    async def check_exchange(self, messages: Sequence[dict[str, Any]], answer: str) -> Verdict:
        """Both directions; the request's verdict when it is blocked or flagged, else the answer's."""
        request = await self.check_input(messages)
        if request.decision in ("block", "flag"):
            return request
        return await self.check_output(messages, answer)

    async def _check(self, direction: Direction, messages: Sequence[dict[str, Any]], answer: str | None, *,
                     final: bool = True) -> Verdict:
        start = time.perf_counter()
        policy = self._policy(direction)
        if not policy.enabled:
            return Verdict("allow", direction, "off")
        text = answer if direction == "output" else str(messages[-1].get("content") or "") if messages else ""
        verdict = self._rules(direction, text or "")
        score: float | None = None
        if verdict is None and self.classifier is not None:
            score = await self.classifier_score(messages, answer)
            verdict = self._classified(direction, score)
            if score is not None and final and self._audited(messages, answer):
                verdict = await self._audit(direction, messages, answer, policy, verdict)
        if verdict is None and self.config.external is not None:
            verdict = await self._external(direction, messages, answer, final=False)
        if verdict is None:
            verdict = await self._judge(direction, messages, answer, policy)
        verdict.classifier_score = score
        if verdict.violated and verdict.tier not in ("fail-open", "fail-closed", "off"):
            verdict.decision = policy.action
            if policy.action == "revise" and answer is not None and final:
                try:
                    verdict.revised = await self._revise(messages, answer, verdict)
                except Exception as exc:  # a failed revision must not let the answer through
                    verdict.decision, verdict.error = "block", f"revision failed: {exc}"
        verdict.latency_s = time.perf_counter() - start
        if self.log is not None and final:
            keep = self.config.classifier is not None and self.config.classifier.keep_text and verdict.tier in AUDITS
            self.log.add(verdict, messages, answer, keep_text=keep)
        return verdict

    def _audited(self, messages: Sequence[dict[str, Any]], answer: str | None) -> bool:
        """Whether this check is one of the ``classifier.audit`` share the judge decides (by a hash of its text)."""
        share = self.config.classifier.audit if self.config.classifier is not None else 0.0
        if share <= 0:
            return False
        digest = hashlib.sha256(f"audit\x1f{exchange_text(messages, answer)}".encode()).digest()
        return int.from_bytes(digest[:4], "big") / 2**32 < share

    async def _audit(self, direction: Direction, messages: Sequence[dict[str, Any]], answer: str | None,
                     policy: DirectionPolicy, classified: Verdict | None) -> Verdict:
        """An audited check: the judge decides, under the tier ``audit-<what the classifier would have done>``;
        when the judge fails, the classifier's own call stands if it made one."""
        judged = await self._judge(direction, messages, answer, policy)
        if judged.tier == "judge":
            judged.tier = f"audit-{classified.decision if classified is not None else 'unsure'}"
        elif classified is not None:
            return classified
        return judged

    def _rules(self, direction: Direction, text: str) -> Verdict | None:
        """Tier 1: a principle's pattern or word found in the text decides (a violation, score 1)."""
        hits = [PrincipleScore(p.name, 1.0, f"rule {match!r}") for p in self.principles
                if p.rules is not None and (match := p.rules.match(text)) is not None]
        return Verdict("block", direction, "rules", violated=hits, scores=hits) if hits else None

    async def classifier_score(self, messages: Sequence[dict[str, Any]], answer: str | None) -> float | None:
        """The classifier's P(violation) of a request (``answer`` None) or an exchange; ``None`` when there is no
        classifier, or it failed or took longer than its ``timeout_s``."""
        if self.classifier is None or self.config.classifier is None:
            return None
        text = exchange_text(messages, answer)
        with anyio.move_on_after(self.config.classifier.timeout_s):
            try:
                return await self._batcher.score(text)
            except Exception:  # a broken classifier passes the check on to the next tier
                return None
        return None

    def _classified(self, direction: Direction, score: float | None) -> Verdict | None:
        """Tier 2: a score at or above ``hi`` is a violation, below ``lo`` is fine; otherwise ask the next tier."""
        if score is None or self.classifier is None:
            return None
        if score >= self.classifier.hi:
            hit = PrincipleScore(self.classifier.label, score, "classifier")
            return Verdict("block", direction, "classifier", violated=[hit], scores=[hit])
        if score < self.classifier.lo:
            return Verdict("allow", direction, "classifier",
                           scores=[PrincipleScore(self.classifier.label, score, "classifier")])
        return None

    async def _external(self, direction: Direction, messages: Sequence[dict[str, Any]], answer: str | None, *,
                        final: bool) -> Verdict | None:
        """Tier 3: the external guard's ``unsafe`` (with categories: these principles) decides; ``safe``
        decides unless ``safe_decides`` is off; a failed, late or unreadable answer passes the check on (unless
        ``final``, when it allows)."""
        external = self.config.external
        assert external is not None
        read: tuple[bool, list[int]] | None = None
        with anyio.move_on_after(external.timeout_s):
            try:
                read = await ask_external_guard(self.engine, external.role, self.principles, messages, answer,
                                                direction, max_tokens=external.max_tokens)
            except CaiError:
                read = None
        if read is None:
            return Verdict("allow", direction, "external", error="no readable answer") if final else None
        unsafe, indexes = read
        if unsafe:
            hits = [PrincipleScore(self.principles[i].name, 1.0, "external") for i in indexes] or [
                PrincipleScore("unsafe content", 1.0, "external")]
            return Verdict("block", direction, "external", violated=hits, scores=hits)
        if external.safe_decides or final:
            return Verdict("allow", direction, "external")
        return None

    async def tiers(self, direction: Direction, messages: Sequence[dict[str, Any]],
                    answer: str | None = None) -> TierReadings:
        """Every tier's own reading of one request or exchange, each asked alone (for measuring the tiers: the
        cascade is what :meth:`check_input` and :meth:`check_output` run)."""
        text = answer if direction == "output" else str(messages[-1].get("content") or "") if messages else ""
        rules = self._rules(direction, text or "")
        external = None
        if self.config.external is not None:
            external = await self._external(direction, messages, answer, final=True)
        judge = await self._judge(direction, messages, answer, self._policy(direction))
        return TierReadings(rules=rules is not None, classifier=await self.classifier_score(messages, answer),
                            external=None if external is None else external.blocked,
                            judge=None if judge.tier != "judge" else bool(judge.violated),
                            judge_score=max((s.score for s in judge.scores), default=None))

    async def _judge(self, direction: Direction, messages: Sequence[dict[str, Any]], answer: str | None,
                     policy: DirectionPolicy) -> Verdict:
        """Tier 2: the judge answers (A)/(B) per principle; P(violation) ≥ threshold is a violation."""
        count = min(self.config.ensemble or len(self.principles), len(self.principles))
        digest = hashlib.sha256(_conversation_text(messages).encode()).hexdigest()
        chosen = draw_principles(self._set, count, rng=random.Random(digest), mode="weighted")
        scores: list[PrincipleScore | None] = [None] * len(chosen)
        conversation = [dict(m) for m in messages]

        async def one(index: int) -> None:
            question = self.by_name[chosen[index].name].question
            if direction == "input":
                p_a = await score_request(self.engine, self.config.judge_role, conversation, question)
            else:
                p_a = await score_response(self.engine, self.config.judge_role, conversation, answer, question)
            if p_a is not None:  # None: an abstention, this principle says nothing
                violation = p_a if direction == "input" else 1.0 - p_a
                scores[index] = PrincipleScore(chosen[index].name, violation, "judge")

        error: str | None = None
        with anyio.move_on_after(self.config.judge_timeout_s) as scope:
            try:
                async with anyio.create_task_group() as tg:
                    for index in range(len(chosen)):
                        tg.start_soon(one, index)
            except* CaiError as group:
                error = "; ".join(dict.fromkeys(f"{type(e).__name__}: {e}" for e in group.exceptions))
        if scope.cancelled_caught:
            error = f"the judge did not answer within {self.config.judge_timeout_s:g}s"
        usable = [s for s in scores if s is not None]
        if error is not None:
            failed = "fail-open" if policy.fail == "open" else "fail-closed"
            return Verdict("allow" if policy.fail == "open" else "block", direction, failed, scores=usable,
                           judge_calls=len(chosen), error=error)
        violated = sorted((s for s in usable if s.score >= policy.threshold), key=lambda s: -s.score)
        return Verdict("allow", direction, "judge", violated=violated, scores=usable, judge_calls=len(chosen))

    async def _revise(self, messages: Sequence[dict[str, Any]], answer: str, verdict: Verdict) -> str:
        """Constitutional AI at inference time: critique → revision of the answer under the violated principles
        that the constitution has (else its first principle by priority)."""
        from cai_async.revision import Reviser, RevisionSettings

        runner = Reviser(self.engine, RevisionSettings(
            critic_role=self.config.judge_role, revision_role=self.config.judge_role,
            critique_max_tokens=self.config.revise_max_tokens, revision_max_tokens=self.config.revise_max_tokens))
        names = {p.name for p in self.constitution.principles}
        principles = [self.constitution.principle(p.name) for p in verdict.violated if p.name in names] or [
            min(self.constitution.principles, key=lambda p: p.priority)]
        current = answer
        record: dict[str, Any] = {"rounds": []}  # the steps' details stay out of the verdict
        for number, principle in enumerate(principles, start=1):
            revised = await runner.revise_step(number, principle, [dict(m) for m in messages], current, record, [])
            current = revised if revised is not None else current
        return current
