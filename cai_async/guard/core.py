"""The guard: a cascade of tiers, cheapest first, checks a request or an answer against the constitution's
principles and returns a :class:`Verdict`. Every tier reads one view of the exchange (:mod:`.exchange`): every
message, name, content part, tool call and tool definition of the request, and each choice of an answer with its
tool calls. Rules (patterns and words the principles carry) decide when they match any of the texts that
:mod:`.normalize` recovers from it (disguises undone, encoded spans decoded); then the classifier trained from
the constitution's own data (``cai train guard``) decides when its score is confidently high or low; then an
external Llama-Guard-style model, when configured; otherwise the constitutional judge (the ``judge`` group,
scored from choice probabilities, the judged text fenced) decides. Text too long to read whole follows
``guard.size`` (blocked by default, never waved through silently). Answers that violate a principle can be
blocked, flagged or revised by the constitution's own critique → revision. Every call goes through the engine."""

from __future__ import annotations

import hashlib
import importlib
import random
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio

from backends.errors import AuthenticationFailed, CaiError, ConfigError, NoChoiceFound, PermanentError
from backends.types import ScoreRequest
from cai_async.constitution import ComparisonSet, Constitution, draw_principles
from cai_async.constitution_io import load_comparison_set, load_constitution
from cai_async.engine import Engine
from cai_async.guard.classifier import GuardClassifier, ScoreBatcher
from cai_async.guard.config import DirectionPolicy, GuardConfig
from cai_async.guard.exchange import (
    Part,
    ReadRequest,
    answer_parts,
    conversation,
    head_tail,
    joined_text,
    request_parts,
    windows,
)
from cai_async.guard.external import ask_external_guard
from cai_async.guard.normalize import decoded, squeeze, views
from cai_async.guard.training_data import exchange_text
from cai_async.guard.verdicts import (
    AUDIT_TEXT_SCHEMA,
    AUDITS,
    VERDICT_SCHEMA,
    Direction,
    GuardPrinciple,
    PrincipleScore,
    TierReadings,
    Verdict,
    VerdictLog,
)
from cai_async.judging import ANSWER_PREFIX, fenced_request_prompt, fenced_response_prompt, quoted

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

_SQUEEZE_MIN = 6
"""A rule word is also looked for with every space and separator taken out (``bo mb``) when it has at least this
many letters and digits; shorter words would match inside unrelated words."""
_RULES_READ = 4
"""The rules read up to this many times the judge's whole reach (``judge_window_chars × max_windows``)."""


_LEET_ALL = str.maketrans("0123456789@$!|+€", "oizeasgtbgasilte")
"""Every leet character read as a letter, wherever it stands (a view of its own: "m4k3 4 80m8" is "make a bomb")."""


_NOT_ASCII_ALNUM = bytes(c for c in range(256) if not chr(c).isalnum() or c >= 128)


def _bare(view: str) -> str:
    """``view``'s ASCII letters and digits alone (a C-speed byte filter): every ASCII word :func:`_spread` matches
    in ``view`` is a substring of it, so a word missing here need not be searched for."""
    return view.encode("utf-8", "surrogatepass").translate(None, _NOT_ASCII_ALNUM).decode("ascii")


def _spread(bare: str) -> re.Pattern[str]:
    """A whole word written with anything but letters and digits between its letters ("b o-m.b"), as a regex."""
    body = "[\\W_]*".join(re.escape(char) for char in bare[1:])
    return re.compile(f"{re.escape(bare[0])}(?<![^\\W_]{re.escape(bare[0])})[\\W_]*{body}(?![^\\W_])")


def _required_literal(pattern: str, *, ignore_case: bool) -> str | None:
    """The longest run of plain ASCII characters every match of ``pattern`` must contain (lower-cased when the
    pattern ignores case), or None: a cheap ``in`` test that rules a view out before the regex runs."""
    try:
        _parser: Any = importlib.import_module("re._parser")  # the standard library's own regex parser
        items = list(_parser.parse(pattern))
    except Exception:  # another Python's internals: no prefilter, the regex alone decides
        return None
    best, run = "", ""
    for op, value in items:
        if op is _parser.LITERAL and value < 128:
            run += chr(value)
            best = max(best, run, key=len)
        else:
            run = ""
    if len(best) < 3:
        return None
    return best.lower() if ignore_case else best


class _RuleMatcher:
    """One principle's rules, compiled once: its patterns (case-insensitive unless written all in lower case,
    which views, being casefolded, match faster), each with a literal it cannot match without; its words as one
    whole-word alternation; and the words long enough to look for with every separator taken out."""

    def __init__(self, name: str, rules: Any) -> None:
        self.name = name
        self.patterns: list[tuple[str, re.Pattern[str], str | None]] = []
        for source in rules.patterns:
            ignore_case = source != source.lower()
            compiled = re.compile(source, re.IGNORECASE if ignore_case else 0)
            self.patterns.append((source, compiled, _required_literal(source, ignore_case=ignore_case)))
        self.words_list = [w.casefold() for w in rules.words]
        self.words = (re.compile(r"\b(?:" + "|".join(re.escape(w) for w in self.words_list) + r")\b")
                      if self.words_list else None)
        self.squeezed = [(w, bare if bare.isascii() else "", _spread(bare)) for w in rules.words
                         if len(bare := squeeze(w)) >= _SQUEEZE_MIN]

    def match(self, views: Sequence[str]) -> str | None:
        """The first pattern or word found in any view (views are casefolded)."""
        for view in views:
            for source, pattern, literal in self.patterns:
                if (literal is None or literal in view) and pattern.search(view):
                    return source
            if self.words is not None and any(w in view for w in self.words_list):
                found = self.words.search(view)
                if found is not None:
                    return found.group()
        return None

    def match_squeezed(self, views: Sequence[tuple[str, str]]) -> str | None:
        """The first long word found with anything but letters and digits between its letters (a whole word:
        "bo mb" and "b-o-m-b" are "bomb", "bombastic" is not); ``views`` pairs each view with its
        :func:`_bare` text, which must hold the word's letters for its regex to be worth running."""
        return next((word for word, bare, spread in self.squeezed
                     if any(bare in squeezed and spread.search(view) for view, squeezed in views)), None)


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


@dataclass(slots=True)
class _Reading:
    """What one check reads: the request's parts and (for an answer) the answer's, as the tiers see them."""

    direction: Direction
    request: list[Part]
    answer: list[Part]
    notice: str | None = None

    @property
    def checked(self) -> list[Part]:
        return self.answer if self.direction == "output" else self.request

    def turns(self) -> list[dict[str, str]]:
        return conversation(self.request)

    def answer_text(self) -> str | None:
        if self.direction != "output":
            return None
        return "\n".join(turn["content"] for turn in conversation(self.answer))


class _Unjudgeable(Exception):
    """The judge's endpoint refused to read a check (a 4xx such as context too long)."""


def _read_messages(messages: Sequence[Any], request: Mapping[str, Any] | None) -> list[Part]:
    if isinstance(messages, ReadRequest):
        return list(messages)
    return request_parts(list(messages), request)


class Guard:
    """Checks requests and answers against the constitution on ``engine`` (see the module docstring)."""

    def __init__(self, engine: Engine, config: GuardConfig, *, log: VerdictLog | None = None) -> None:
        self.engine = engine
        self.config = config
        self.principles = guard_principles(config.principles)
        self.by_name = {p.name: p for p in self.principles}
        self._matchers: dict[frozenset[str], list[_RuleMatcher]] = {}  # by the roles they read (empty: all)
        for principle in self.principles:
            if principle.rules is not None:
                roles = frozenset(principle.rules.roles) | ({"developer"} if "system" in principle.rules.roles
                                                            else set())
                self._matchers.setdefault(roles, []).append(_RuleMatcher(principle.name, principle.rules))
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

    @staticmethod
    def read_request(messages: Sequence[Any], request: Mapping[str, Any] | None = None) -> ReadRequest:
        """The parts of a request (its ``messages`` in any shape the OpenAI API allows, and the rest of the
        ``request`` body); pass them to the checks of one request's answers to read it once. Raises
        :class:`~cai_async.guard.exchange.ExchangeError` for a shape the API does not allow."""
        return messages if isinstance(messages, ReadRequest) else request_parts(list(messages), request)

    async def check_input(self, messages: Sequence[Any], *, request: Mapping[str, Any] | None = None) -> Verdict:
        """Whether a request may go to the model: every message of every role, names, tool calls and tool
        results, and (with ``request``, the whole body) the tools offered and the other fields, are read."""
        return await self._check(_Reading("input", _read_messages(messages, request), []))

    async def check_output(self, messages: Sequence[Any], answer: str | Mapping[str, Any], *, final: bool = True,
                           choice: int = 0, request: Mapping[str, Any] | None = None) -> Verdict:
        """Whether an answer may go to the client — its text, or an assistant message with tool calls (one choice
        of a completion: check each). With the ``revise`` action (and ``final``), a violating answer is rewritten
        and returned in ``Verdict.revised``."""
        return await self._check(_Reading("output", _read_messages(messages, request),
                                          answer_parts(answer, choice=choice)), final=final)

    async def check_exchange(self, messages: Sequence[Any], answer: str | Mapping[str, Any]) -> Verdict:
        """Both directions; the request's verdict when it is blocked or flagged, else the answer's."""
        request = await self.check_input(messages)
        if request.decision in ("block", "flag"):
            return request
        return await self.check_output(messages, answer)

    def _reach(self) -> int:
        return self.config.size.judge_window_chars * self.config.size.max_windows

    def _oversize(self, direction: Direction, length: int, why: str) -> Verdict:
        """The ``size.oversize`` verdict on a check the judge cannot read whole."""
        what = "request" if direction == "input" else "answer"
        allow = self.config.size.oversize == "allow"
        notice = (f"the {what} is too long for the guard to check: {why}; send less text, or raise "
                  "guard.size.judge_window_chars / guard.size.max_windows (or set guard.size.oversize)")
        if allow:
            notice = f"the {what} was passed on unchecked past the rules: {why} (guard.size.oversize: allow)"
        verdict = Verdict("allow" if allow else "block", direction, "oversize", notice=notice)
        verdict.violated = [] if allow else [PrincipleScore("size", 1.0, f"{length} characters")]
        return verdict

    async def _check(self, reading: _Reading, *, final: bool = True) -> Verdict:
        start = time.perf_counter()
        direction = reading.direction
        policy = self._policy(direction)
        if not policy.enabled:
            return Verdict("allow", direction, "off")
        text = joined_text(reading.checked)
        reach = self._reach()
        verdict = self._rules(direction, reading.checked, limit=_RULES_READ * reach)
        if verdict is None and len(text) > reach:
            why = f"{len(text)} characters where the judge reads at most {reach}"
            if self.config.size.oversize == "truncate":
                reading = self._truncated(reading, reach)
                reading.notice = f"only the head and the tail of the {direction} were checked: {why}"
            else:
                verdict = self._oversize(direction, len(text), why)
        score: float | None = None
        classified_text = head_tail(exchange_text(reading.turns(), reading.answer_text()),
                                    self.config.size.classifier_chars)
        if verdict is None and self.classifier is not None:
            score = await self._classifier_score(classified_text)
            verdict = self._classified(direction, score)
            if score is not None and final and self._audited(classified_text):
                verdict = await self._audit(reading, policy, verdict)
        if verdict is None and self.config.external is not None:
            verdict = await self._external(reading, final=False)
        if verdict is None:
            verdict = await self._judge(reading, policy)
        verdict.classifier_score = score
        verdict.notice = verdict.notice or reading.notice
        if verdict.violated and verdict.tier not in ("fail-open", "fail-closed", "off", "oversize"):
            verdict.decision = policy.action
            if policy.action == "revise" and direction == "output" and final:
                try:
                    verdict.revised = await self._revise(reading, verdict)
                except Exception as exc:  # a failed revision must not let the answer through
                    verdict.decision, verdict.error = "block", f"revision failed: {exc}"
        verdict.latency_s = time.perf_counter() - start
        if self.log is not None and final:
            keep = self.config.classifier is not None and self.config.classifier.keep_text and verdict.tier in AUDITS
            self.log.add(verdict, classified_text, keep_text=keep)
        return verdict

    @staticmethod
    def _truncated(reading: _Reading, reach: int) -> _Reading:
        """The reading with each checked part cut to its head and tail, so that together they fit ``reach``."""
        checked = reading.checked
        share = max(200, reach // max(1, len(checked)))
        cut = [Part(p.role, p.where, p.message, head_tail(p.text, share)) for p in checked]
        if reading.direction == "output":
            return _Reading("output", reading.request, cut)
        return _Reading("input", cut, [])

    def _rules(self, direction: Direction, parts: Sequence[Part], *, limit: int) -> Verdict | None:
        """Tier 1: a principle's pattern or word found in any view of the text it reads (its ``roles``' parts, one
        after another; folded, de-leeted, rejoined, decoded: :func:`~cai_async.guard.normalize.views`) decides (a
        violation, score 1). Encoded spans cut across parts are decoded from the parts put back together as well.
        At most ``limit`` characters are read (head and tail)."""
        hits: list[PrincipleScore] = []
        for roles, matchers in self._matchers.items():
            chosen = [p for p in parts if not roles or p.role in roles]
            text = head_tail(joined_text(chosen), limit)
            if not text:
                continue
            seen = views(text)
            if len(chosen) > 1:
                known = set(seen)
                seen += [view for span in decoded(text.replace("\n", "")) for view in views(span)
                         if view not in known]
            squeezed: list[tuple[str, str]] | None = None
            for matcher in matchers:
                match = matcher.match(seen)
                if match is None and matcher.squeezed:
                    squeezed = squeezed if squeezed is not None else [
                        (view, _bare(view)) for view in (*seen, seen[0].translate(_LEET_ALL))]
                    match = matcher.match_squeezed(squeezed)
                if match is not None:
                    hits.append(PrincipleScore(matcher.name, 1.0, f"rule {match!r}"))
        return Verdict("block", direction, "rules", violated=hits, scores=hits) if hits else None

    def _audited(self, text: str) -> bool:
        """Whether this check is one of the ``classifier.audit`` share the judge decides (by a hash of its text)."""
        share = self.config.classifier.audit if self.config.classifier is not None else 0.0
        if share <= 0:
            return False
        digest = hashlib.sha256(f"audit\x1f{text}".encode("utf-8", "surrogatepass")).digest()
        return int.from_bytes(digest[:4], "big") / 2**32 < share

    async def _audit(self, reading: _Reading, policy: DirectionPolicy, classified: Verdict | None) -> Verdict:
        """An audited check: the judge decides, under the tier ``audit-<what the classifier would have done>``;
        when the judge fails, the classifier's own call stands if it made one."""
        judged = await self._judge(reading, policy)
        if judged.tier == "judge":
            judged.tier = f"audit-{classified.decision if classified is not None else 'unsure'}"
        elif classified is not None:
            return classified
        return judged

    async def classifier_score(self, messages: Sequence[Any], answer: str | Mapping[str, Any] | None) -> float | None:
        """The classifier's P(violation) of a request (``answer`` None) or an exchange; ``None`` when there is no
        classifier, or it failed or took longer than its ``timeout_s``."""
        reading = _Reading("input" if answer is None else "output", _read_messages(messages, None),
                           answer_parts(answer))
        return await self._classifier_score(head_tail(exchange_text(reading.turns(), reading.answer_text()),
                                                      self.config.size.classifier_chars))

    async def _classifier_score(self, text: str) -> float | None:
        if self.classifier is None or self.config.classifier is None:
            return None
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

    async def _external(self, reading: _Reading, *, final: bool) -> Verdict | None:
        """Tier 3: the external guard's ``unsafe`` (with categories: these principles) decides; ``safe``
        decides unless ``safe_decides`` is off; a failed, late or unreadable answer passes the check on (unless
        ``final``, when it allows)."""
        external = self.config.external
        assert external is not None
        direction = reading.direction
        read: tuple[bool, list[int]] | None = None
        with anyio.move_on_after(external.timeout_s):
            try:
                read = await ask_external_guard(self.engine, external.role, self.principles, reading.turns(),
                                                reading.answer_text(), direction, max_tokens=external.max_tokens)
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

    async def tiers(self, direction: Direction, messages: Sequence[Any],
                    answer: str | Mapping[str, Any] | None = None) -> TierReadings:
        """Every tier's own reading of one request or exchange, each asked alone (for measuring the tiers: the
        cascade is what :meth:`check_input` and :meth:`check_output` run)."""
        reading = _Reading(direction, _read_messages(messages, None), answer_parts(answer))
        rules = self._rules(direction, reading.checked, limit=_RULES_READ * self._reach())
        external = None
        if self.config.external is not None:
            external = await self._external(reading, final=True)
        judge = await self._judge(reading, self._policy(direction))
        return TierReadings(rules=rules is not None, classifier=await self.classifier_score(messages, answer),
                            external=None if external is None else external.blocked,
                            judge=None if judge.tier != "judge" else bool(judge.violated),
                            judge_score=max((s.score for s in judge.scores), default=None))

    def _judge_prompts(self, reading: _Reading) -> list[tuple[str, bool]]:
        """The quoted text the judge reads, cut into windows: ``(body, is_answer)`` pairs. An answer's windows
        each carry the head and tail of the conversation before it."""
        size = self.config.size.judge_window_chars
        if reading.direction == "input":
            return [(body, False) for body in windows(quoted(reading.turns()), size)]
        context = head_tail(quoted(reading.turns()), size // 3)
        answer = "\n".join(f"> {line}" for line in (reading.answer_text() or "").split("\n"))
        room = max(200, size - len(context))
        return [(f"{context}\n\nAssistant's response:\n{piece}", True) for piece in windows(answer, room)]

    async def _judge(self, reading: _Reading, policy: DirectionPolicy) -> Verdict:
        """The judge answers (A)/(B) per principle and window; P(violation) ≥ threshold is a violation."""
        direction = reading.direction
        bodies = self._judge_prompts(reading)
        most = self.config.size.max_windows
        if len(bodies) > most:
            if self.config.size.oversize != "truncate":
                return self._oversize(direction, sum(len(b) for b, _ in bodies),
                                      f"{len(bodies)} judge windows where at most {most} are read")
            reading.notice = reading.notice or f"the judge read {most} of {len(bodies)} windows (head and tail)"
            bodies = bodies[: (most + 1) // 2] + bodies[len(bodies) - most // 2:]
        count = min(self.config.ensemble or len(self.principles), len(self.principles))
        digest = hashlib.sha256(bodies[0][0].encode("utf-8", "surrogatepass")).hexdigest()
        chosen = draw_principles(self._set, count, rng=random.Random(digest), mode="weighted")
        scores: list[PrincipleScore | None] = [None] * len(chosen)

        async def one(index: int) -> None:
            question = self.by_name[chosen[index].name].question
            for body, is_answer in bodies:
                prompt = fenced_response_prompt(body, question) if is_answer else fenced_request_prompt(body, question)
                try:
                    scored = await self.engine.score(self.config.judge_role, ScoreRequest(
                        [{"role": "user", "content": prompt}], answer_prefix=ANSWER_PREFIX))
                except NoChoiceFound:
                    continue  # an abstention: this window says nothing under this principle
                except PermanentError as exc:
                    if exc.status in (400, 413, 422) and not isinstance(exc, AuthenticationFailed):
                        raise _Unjudgeable(str(exc)) from None
                    raise
                p_a = scored.probs["A"]
                violation = 1.0 - p_a if is_answer else p_a
                current = scores[index]
                if current is None or violation > current.score:
                    scores[index] = PrincipleScore(chosen[index].name, violation, "judge")

        error: str | None = None
        unjudgeable: str | None = None
        calls = len(chosen) * len(bodies)
        with anyio.move_on_after(self.config.judge_timeout_s) as scope:
            try:
                async with anyio.create_task_group() as tg:
                    for index in range(len(chosen)):
                        tg.start_soon(one, index)
            except* _Unjudgeable as group:
                unjudgeable = str(group.exceptions[0])
            except* CaiError as group:
                error = "; ".join(dict.fromkeys(f"{type(e).__name__}: {e}" for e in group.exceptions))
        if unjudgeable is not None:
            verdict = self._oversize(direction, sum(len(b) for b, _ in bodies),
                                     f"the judge's endpoint refused to read it ({unjudgeable})")
            verdict.judge_calls = calls
            return verdict
        if scope.cancelled_caught:
            error = f"the judge did not answer within {self.config.judge_timeout_s:g}s"
        usable = [s for s in scores if s is not None]
        if error is not None:
            if policy.fail == "open":
                return Verdict("allow", direction, "fail-open", scores=usable, judge_calls=calls, error=error,
                               notice=f"not checked by the judge, passed on (fail: open): {error}")
            return Verdict("block", direction, "fail-closed", scores=usable, judge_calls=calls, error=error,
                           notice=f"not checked by the judge, blocked (fail: closed): {error}")
        violated = sorted((s for s in usable if s.score >= policy.threshold), key=lambda s: -s.score)
        return Verdict("allow", direction, "judge", violated=violated, scores=usable, judge_calls=calls)

    async def _revise(self, reading: _Reading, verdict: Verdict) -> str:
        """Constitutional AI at inference time: critique → revision of the answer under the violated principles
        that the constitution has (else its first principle by priority)."""
        from cai_async.revision import Reviser, RevisionSettings

        runner = Reviser(self.engine, RevisionSettings(
            critic_role=self.config.judge_role, revision_role=self.config.judge_role,
            critique_max_tokens=self.config.revise_max_tokens, revision_max_tokens=self.config.revise_max_tokens))
        names = {p.name for p in self.constitution.principles}
        principles = [self.constitution.principle(p.name) for p in verdict.violated if p.name in names] or [
            min(self.constitution.principles, key=lambda p: p.priority)]
        current = reading.answer_text() or ""
        record: dict[str, Any] = {"rounds": []}  # the steps' details stay out of the verdict
        turns: list[dict[str, Any]] = [dict(t) for t in reading.turns()]
        for number, principle in enumerate(principles, start=1):
            revised = await runner.revise_step(number, principle, [dict(m) for m in turns], current, record, [])
            current = revised if revised is not None else current
        return current
