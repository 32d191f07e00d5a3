"""Revision quality gates: pure checks of one revision against what it was made from, so a chain keeps (and the
SFT export trains on) only revisions that answer the person.

A revision fails a gate when it

- ``copies_critique``: is a near-copy of its own critique, or mostly made of runs copied from it;
- ``restates_request``: is a near-copy of the person's last message, or a near-copy of (or mostly made of runs
  copied from) the critique request or the revision request;
- ``unchanged``: is the text it revises (similarity 1.0 by default: identical once case and spacing are
  ignored);
- ``meta``: talks about "the last response" (or the assistant's answer, the human's request, the critique)
  instead of answering;
- ``loops``: repeats itself (the share of its word n-grams that repeat an earlier one, or one sentence said
  three times);
- ``truncated``: was cut at the revision's ``max_tokens`` (``finish_reason == "length"``).

:func:`check_revision` runs them all and returns a :class:`GateReport`: every gate's number, and the first
failed gate in the order above (``report.failed``). The thresholds are a :class:`GateConfig` (recipe key
``sl.gates``). :class:`GateTally` adds up the per-step records a run wrote, for the run table and the card.
Nothing here calls a model or reads a file."""

from __future__ import annotations

import difflib
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field

from backends.strict import StrictModel

__all__ = [
    "GATES",
    "GateConfig",
    "GateName",
    "GateReport",
    "GateResult",
    "GateTally",
    "check_revision",
    "copied_share",
    "meta_phrases",
    "repeated_ngram_share",
    "repeated_sentence_count",
    "similarity",
]

GateName = Literal["copies_critique", "restates_request", "unchanged", "meta", "loops", "truncated"]
GATES: tuple[GateName, ...] = ("copies_critique", "restates_request", "unchanged", "meta", "loops", "truncated")
"""Every gate, in the order they are checked: what a failed revision copied first, then how it reads, then
whether it was cut (the first failed one names the step's failure)."""


class GateConfig(StrictModel):
    """Revision quality gates (recipe key ``sl.gates``). A similarity threshold fails a revision whose similarity
    (0–1: difflib's ratio on lower-cased text with spacing collapsed, or, against the critique and the
    constitution's requests, the share of the revision's words copied from them in runs of 3 or more, whichever
    is higher) is at least the threshold; ``null`` turns that gate off. A failed revision is tried once more
    (another seed; at ``retry_temperature`` when the chain's temperature is 0, since a greedy model would only
    repeat itself), then the previous response is kept."""

    enabled: bool = True
    """False: every revision is taken as it comes (the behaviour before the gates)."""
    copies_critique: float | None = Field(default=0.8, ge=0, le=1)
    """Fail a revision at least this similar to its own critique."""
    restates_request: float | None = Field(default=0.9, ge=0, le=1)
    """Fail a revision at least this similar to the person's last message (difflib's ratio only: a good answer
    may quote the text it was asked about), the critique request or the revision request."""
    unchanged: float | None = Field(default=1.0, ge=0, le=1)
    """Fail a revision at least this similar to the text it revises (1.0: only an identical one)."""
    loops: float | None = Field(default=0.3, gt=0, le=1)
    """Fail a revision whose share of repeated word n-grams (``loop_ngram`` words) is at least this."""
    loop_ngram: int = Field(default=4, ge=2, le=16)
    loop_min_words: int = Field(default=12, ge=1)
    """Texts shorter than this many words are never said to loop."""
    loop_sentence_repeats: int | None = Field(default=3, ge=2)
    """Fail a revision that says one sentence (of 5 words or more) this many times, whatever the n-gram share."""
    truncated: bool = True
    """Fail a revision cut at the revision's ``max_tokens`` (``finish_reason == "length"``)."""
    meta: bool = True
    """Fail a revision that talks about "the last response" (or the assistant's answer, the human's request,
    the critique) instead of answering."""
    retry: bool = True
    """Try a failed revision once more before keeping the previous response."""
    retry_temperature: float = Field(default=0.7, ge=0)
    """The retry's temperature when the chain's is 0 (a greedy retry would repeat the failed answer)."""


@dataclass(frozen=True)
class GateResult:
    """One gate's verdict on one revision: its ``number`` (a similarity, a repeated share, a count of phrases;
    1.0/0.0 for ``truncated``), the ``threshold`` it was held to, and ``detail`` (what it was compared with, the
    phrase found)."""

    gate: GateName
    number: float
    threshold: float
    failed: bool
    detail: str = ""


@dataclass(frozen=True)
class GateReport:
    """Every gate's result for one revision, in :data:`GATES` order (gates turned off are left out)."""

    results: tuple[GateResult, ...] = ()

    @property
    def failed(self) -> GateResult | None:
        """The first failed gate, or None when the revision passed."""
        return next((r for r in self.results if r.failed), None)

    @property
    def passed(self) -> bool:
        """True when no gate failed."""
        return self.failed is None

    @property
    def failed_gates(self) -> list[str]:
        """The names of every failed gate, in check order."""
        return [r.gate for r in self.results if r.failed]

    def result(self, gate: GateName) -> GateResult | None:
        """The result of ``gate`` (None when it was turned off)."""
        return next((r for r in self.results if r.gate == gate), None)


_SPACE = re.compile(r"\s+")
_WORD = re.compile(r"\w+(?:['’]\w+)?")
_MAX_CHARS = 4000
"""Longer texts are compared on their first this many characters (difflib is quadratic at worst)."""


def _norm(text: str) -> str:
    return _SPACE.sub(" ", text.strip().lower()).replace("’", "'")[:_MAX_CHARS]


def similarity(a: str, b: str) -> float:
    """difflib's ratio (2 × matched characters ÷ both lengths, 0–1) of two texts, lower-cased with spacing
    collapsed; 1.0 for identical texts, 0.0 when either is empty. Texts so far apart that difflib's quick upper
    bound is under 0.3 get that bound (the full match is skipped)."""
    x, y = _norm(a), _norm(b)
    if not x or not y:
        return 0.0
    if x == y:
        return 1.0
    matcher = difflib.SequenceMatcher(None, x, y, autojunk=False)
    if matcher.real_quick_ratio() < 0.3 or matcher.quick_ratio() < 0.3:  # far apart: skip the full match
        return matcher.quick_ratio()
    return matcher.ratio()


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text.replace("’", "'")[:_MAX_CHARS])]


def copied_share(text: str, source: str, *, min_run: int = 3) -> float:
    """The share of ``text``'s words that sit in runs of at least ``min_run`` words copied, in order, from
    ``source`` (1.0: ``text`` is a cut-down copy of ``source``; 0.0 when either is empty)."""
    mine, theirs = _words(text), _words(source)
    if not mine or not theirs:
        return 0.0
    matcher = difflib.SequenceMatcher(None, mine, theirs, autojunk=False)
    return sum(b.size for b in matcher.get_matching_blocks() if b.size >= min_run) / len(mine)


def _copy(text: str, source: str) -> float:
    return max(similarity(text, source), copied_share(text, source))


def repeated_sentence_count(text: str, *, min_words: int = 5) -> int:
    """How many times ``text`` says its most repeated sentence of at least ``min_words`` words (case, spacing and
    punctuation ignored); 0 when it has none that long."""
    sentences = [tuple(_words(s)) for s in re.split(r"(?<=[.!?])\s+|\n+", text)]
    counts = Counter(s for s in sentences if len(s) >= min_words)
    return max(counts.values(), default=0)


def repeated_ngram_share(text: str, n: int = 4) -> float:
    """The share of ``text``'s word n-grams that repeat an earlier n-gram of it (0: none repeats; a text that
    says one sentence over and over comes close to 1)."""
    words = _words(text)
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


_DET = r"(?:the|this|that|my|your|its|their|his|her|our)"
_WHOSE = (r"(?:last|previous|prior|preceding|above|earlier|original|initial|former|old|given|provided|following|"
          r"revised|rewritten|assistant['’]s|ai['’]s|model['’]s|chatbot['’]s|bot['’]s)")
_SENTENCE = r"(?:^|(?<=[.!?])\s+|\n)\W*"
"""The start of the text or of a sentence in it."""
_META = [
    re.compile(p, re.IGNORECASE | re.MULTILINE) for p in (
        # "the last response", "the previous answer", "the assistant's reply", "the given response"
        rf"\b{_DET}\s+{_WHOSE}\s+(?:response|answer|reply|message|output)s?\b",
        # a sentence about "the response" / "this answer": "The response does not…", "This response treats…"
        # ("The answer is…", "My answer is…", "Your response may…" may well be answers; "the response to…", "the
        # response time" are not about one)
        rf"(?:{_SENTENCE}|(?<=:)\s+)(?:(?:the|this|that)\s+(?:response|reply)|(?:this|that)\s+answer)\s+"
        r"(?!to\b|of\b|from\b|for\b|times?\b|teams?\b|rates?\b|plans?\b|units?\b)\w+",
        # "Rewrite: …", "Rewrite this response so that…": the revision request said back
        rf"{_SENTENCE}(?:rewrite|revise|rephrase)\b",
        # "I will rewrite the response…", "by simply rewriting the answer" (a request to rewrite it is not this)
        r"\b(?:i(?:['’]ll|['’]ve|['’]d| will| have| would| am| can)?|let me|by|after)\s+(?:\w+\s+){0,2}?"
        r"(?:rewrit\w*|revis\w*|edit\w*)\s+(?:the|this|that|my|your)\s+(?:\w+\s+)?(?:response|answer|reply)\b",
        # "No changes are needed": a verdict on the response, not an answer
        r"\bno\s+(?:further\s+)?(?:changes?|revisions?|edits?)\s+(?:are\s+|is\s+)?(?:needed|required|necessary)\b",
        # "the human's question", "the user's request"
        r"\bthe\s+(?:human|user|person)['’]s\s+(?:request|question|query|message|prompt|questions|requests)\b",
        # "the critique request", "the revision request", "the critique (above)"
        r"\bthe\s+(?:critique|revision)\s+request\b",
        r"\b(?:the|this|my|your)\s+critique\s+(?:above|says|points|suggests|is|was|of the (?:last|previous))\b",
    )
]


def meta_phrases(text: str) -> list[str]:
    """The phrases of ``text`` that talk about a response, the request or the critique rather than answering
    ("the last response", "The response is…", "the human's question", "the revision request")."""
    return [m.group(0).strip(" \n\t\"'*-") for pattern in _META for m in pattern.finditer(text)]


def check_revision(
    revision: str,
    *,
    critique: str = "",
    revised: str = "",
    prompt: str = "",
    requests: Mapping[str, str] | None = None,
    finish_reason: str | None = None,
    config: GateConfig | None = None,
) -> GateReport:
    """Run every gate ``config`` turns on over ``revision``: ``critique`` is its own critique, ``revised`` the text
    it revises, ``prompt`` the person's last message, ``requests`` the constitution's texts it must not restate,
    by name (e.g. ``{"the revision request": principle.revision}``), ``finish_reason`` the revision call's."""
    cfg = config or GateConfig()
    results: list[GateResult] = []
    if cfg.copies_critique is not None:
        value = _copy(revision, critique)
        results.append(GateResult("copies_critique", round(value, 4), cfg.copies_critique,
                                  bool(critique.strip()) and value >= cfg.copies_critique, "the critique"))
    if cfg.restates_request is not None:
        measured = [(n, _copy(revision, t)) for n, t in (requests or {}).items() if t.strip()]
        if prompt.strip():
            measured.append(("the person's request", similarity(revision, prompt)))
        name, value = max(measured, key=lambda item: item[1], default=("", 0.0))
        results.append(GateResult("restates_request", round(value, 4), cfg.restates_request,
                                  bool(name) and value >= cfg.restates_request, name))
    if cfg.unchanged is not None:
        value = similarity(revision, revised)
        results.append(GateResult("unchanged", round(value, 4), cfg.unchanged,
                                  bool(revised.strip()) and value >= cfg.unchanged, "the text it revises"))
    if cfg.meta:
        found = meta_phrases(revision)
        results.append(GateResult("meta", float(len(found)), 1.0, bool(found), "; ".join(found[:3])))
    if cfg.loops is not None:
        words = len(_WORD.findall(revision))
        share = repeated_ngram_share(revision, cfg.loop_ngram) if words >= cfg.loop_min_words else 0.0
        said = repeated_sentence_count(revision)
        again = cfg.loop_sentence_repeats is not None and said >= cfg.loop_sentence_repeats
        detail = f"a sentence said {said} times" if again else f"{cfg.loop_ngram}-word n-grams repeated"
        results.append(GateResult("loops", round(share, 4), cfg.loops, share >= cfg.loops or again, detail))
    if cfg.truncated:
        cut = finish_reason == "length"
        results.append(GateResult("truncated", float(cut), 1.0, cut, "cut at max_tokens" if cut else ""))
    return GateReport(tuple(results))


@dataclass
class GateTally:
    """Adds up the gate records of chain rows (their ``rounds`` steps and ``revisions_passed/failed``): revision
    steps, first attempts that failed (per gate, a step counted under every gate it failed), retries that passed,
    steps rejected (previous response kept), and chains left with no passing revision."""

    steps: int = 0
    """Revisions the gates checked (early stops, steps run with the gates off and steps of rows from before the
    gates are not counted)."""
    first_failed: int = 0
    retried: int = 0
    retry_passed: int = 0
    rejected: int = 0
    by_gate: Counter[str] = field(default_factory=Counter)
    """First attempts that failed each gate."""
    rejected_by_gate: Counter[str] = field(default_factory=Counter)
    """Rejected steps by the gate their last attempt failed first."""
    chains: int = 0
    chains_without_passing: int = 0
    """Chains that tried at least one revision and kept none (the exports leave them out by default)."""

    def add_chain(self, row: Mapping[str, Any]) -> None:
        """Count one chain row (a dict with ``rounds``, and ``revisions_passed``/``revisions_failed`` when the row
        has gate records)."""
        self.chains += 1
        for step in row.get("rounds") or []:
            self.add_step(step)
        if (row.get("revisions_failed") or 0) > 0 and not (row.get("revisions_passed") or 0):
            self.chains_without_passing += 1

    def add_step(self, step: Mapping[str, Any]) -> None:
        """Count one step record (with ``gate_attempts``, ``gates_first``, ``gates_retry``, ``gate``)."""
        attempts = step.get("gate_attempts") or 0
        if not attempts or step.get("gates_first") is None:  # no revision, or one the gates did not check
            return
        self.steps += 1
        first = list(step.get("gates_first") or [])
        if first:
            self.first_failed += 1
            self.by_gate.update(first)
        if attempts > 1:
            self.retried += 1
            if step.get("gate") is None:
                self.retry_passed += 1
        if step.get("gate") is not None:
            self.rejected += 1
            self.rejected_by_gate[str(step["gate"])] += 1

    def update(self, rows: Iterable[Mapping[str, Any]]) -> GateTally:
        """Count every row of ``rows``; return self."""
        for row in rows:
            self.add_chain(row)
        return self

    def as_dict(self) -> dict[str, Any]:
        """Plain data for ``summary.json``, the run table and the card (rates rounded to 0.001)."""
        def rate(n: int, of: int) -> float | None:
            return round(n / of, 3) if of else None

        return {
            "revision_steps": self.steps, "first_failed": self.first_failed,
            "first_failed_rate": rate(self.first_failed, self.steps),
            "by_gate": {g: self.by_gate[g] for g in GATES if self.by_gate[g]},
            "by_gate_rate": {g: rate(self.by_gate[g], self.steps) for g in GATES if self.by_gate[g]},
            "retried": self.retried, "retry_passed": self.retry_passed, "rejected": self.rejected,
            "rejected_rate": rate(self.rejected, self.steps),
            "rejected_by_gate": {g: self.rejected_by_gate[g] for g in GATES if self.rejected_by_gate[g]},
            "chains": self.chains, "chains_without_passing": self.chains_without_passing,
        }
