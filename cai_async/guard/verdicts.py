"""The guard's bottom floor: the value types every tier and report shares (principles as the guard checks them,
scores, verdicts, what each tier reads), the verdict log's schemas, its writer and its reader."""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import polars as pl

from cai_async.store import ShardWriter, read_shards

__all__ = [
    "AUDITS",
    "AUDIT_TEXT_SCHEMA",
    "MARKED_TIERS",
    "VERDICT_SCHEMA",
    "Decision",
    "Direction",
    "GuardPrinciple",
    "PrincipleScore",
    "TierReadings",
    "Verdict",
    "VerdictLog",
    "read_verdicts",
]

Direction = Literal["input", "output"]
Decision = Literal["allow", "flag", "block", "revise"]

AUDITS = frozenset({"audit-allow", "audit-block", "audit-unsure"})
"""The tiers of audited checks: the judge decided; the suffix is what the classifier would have done."""

MARKED_TIERS = frozenset({"fail-open", "fail-closed", "oversize"})
"""Tiers whose verdict is marked on the answer even when it allows: the guard could not check as configured."""


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
    fail-closed (the judge could not answer) | oversize (too long to check, or the judge could not read it) |
    off"""
    violated: list[PrincipleScore] = field(default_factory=list)
    scores: list[PrincipleScore] = field(default_factory=list)
    latency_s: float = 0.0
    judge_calls: int = 0
    revised: str | None = None
    error: str | None = None
    classifier_score: float | None = None
    """The classifier tier's P(violation), when it was asked (also when it passed the check on)."""
    notice: str | None = None
    """Why the check was not the one configured (fail-open, oversize), in words for the client and the console."""

    @property
    def blocked(self) -> bool:
        return self.decision == "block"

    @property
    def marked(self) -> bool:
        """Whether the answer must carry this verdict: anything but a plain allow, or a check that could not be
        made as configured (a fail-open allow is never silent)."""
        return self.decision != "allow" or self.tier in MARKED_TIERS or self.notice is not None

    def refusal(self) -> str:
        """A plain-words refusal that names the principles (what a blocked request or answer is replaced by)."""
        names = ", ".join(p.name for p in self.violated) or "the guard's principles"
        what = "this request" if self.direction == "input" else "that answer"
        return f"I can't help with {what}: it goes against the principle of {names}."

    def as_dict(self) -> dict[str, Any]:
        """The verdict as the proxy marks it on an answer (``cai_guard``)."""
        out = {"decision": self.decision, "direction": self.direction, "tier": self.tier,
               "violated": [p.name for p in self.violated],
               "scores": {p.name: round(p.score, 4) for p in self.scores}, "latency_s": round(self.latency_s, 4)}
        return {**out, "notice": self.notice} if self.notice is not None else out


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

    def add(self, verdict: Verdict, text: str, *, keep_text: bool = False) -> None:
        """Log a verdict on ``text`` (the exchange as the classifier reads it: only its hash is kept, unless
        ``keep_text``)."""
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass"))
        row = {"id": uuid.uuid4().hex, "request_hash": digest.hexdigest()[:16], "direction": verdict.direction,
               "created_at": time.time()}
        self.writer.add({
            **row, "decision": verdict.decision, "tier": verdict.tier, "violated": [p.name for p in verdict.violated],
            "scores": [{"name": p.name, "score": p.score} for p in verdict.scores], "judge_calls": verdict.judge_calls,
            "classifier_score": verdict.classifier_score, "latency_s": verdict.latency_s,
            "error": verdict.error or verdict.notice,
        })
        if keep_text:
            if self.texts is None:
                self.texts = ShardWriter(self.run_dir / "guard" / "audits", shard_rows=512, schema=AUDIT_TEXT_SCHEMA,
                                         flush_every_s=self.flush_every_s)
            self.texts.add({**row, "text": text, "violated": bool(verdict.violated)})

    def flush(self) -> None:
        self.writer.flush()
        if self.texts is not None:
            self.texts.flush()


def read_verdicts(run_dir: str | Path) -> pl.DataFrame:
    """The rows of ``RUN_DIR/guard/verdicts`` (an empty frame when the guard never served this run)."""
    return read_shards(Path(run_dir) / "guard" / "verdicts")


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


