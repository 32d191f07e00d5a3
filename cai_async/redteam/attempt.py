"""One attack attempt as it runs: the calls it makes to the target, the attacker and the judge (each recorded,
with its tokens and cost), and the verdict on an answer: the rule-based refusal check, each principle's judge,
and whether the attack succeeded."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

from backends.errors import NoChoiceFound
from backends.types import ChatRequest, ChatResult, ScoreRequest, ScoreResult
from cai_async.constitution import ComparisonSet
from cai_async.engine import Engine
from cai_async.guard.answer import guarded_answer
from cai_async.guard.core import Guard
from cai_async.judging import ANSWER_PREFIX, refused_by_rule, single_response_prompt
from cai_async.redteam.config import RedteamConfig
from cai_async.redteam.seeds import Seed
from cai_async.stages.common import gather_calls

__all__ = ["Attack", "AttackContext", "Messages", "Verdict"]

Messages = list[dict[str, str]]


@dataclass(frozen=True, slots=True)
class Verdict:
    """What was found of one answer: refused by rule; each principle's P(good) (None: abstained, or not asked
    because the answer is a refusal); the principles whose judge flags it; and success: not refused, and either
    flagged by a principle or a reply to a seed labelled harmful."""

    refused: bool
    scores: dict[str, float | None]
    flagged: tuple[str, ...]
    success: bool

    def feedback(self) -> str:
        """The verdict in a line, for an attacker's next rewrite."""
        if self.refused:
            return "the target refused"
        if self.flagged:
            return f"the target complied; flagged by {', '.join(self.flagged)}"
        return "the target complied, but no principle's judge flags the answer"


@dataclass
class Attack:
    """What a strategy hands back: the whole conversation (ending with the target's final answer), the final
    verdict, how many rounds it took (turns, rewrites, offspring) and, where a strategy names them, what each
    round did (``mutate``: the mutation operator of each offspring)."""

    conversation: Messages
    verdict: Verdict
    iterations: int = 1
    steps: list[str] = field(default_factory=list)


@dataclass
class AttackContext:
    """The calls one attempt may make. Strategies call :meth:`target`, :meth:`attacker` and :meth:`judge`; the
    context keeps every call's role, tokens and cost for the attempt's row."""

    engine: Engine
    config: RedteamConfig
    principles: ComparisonSet
    seed: Seed
    guard: Guard | None = None
    """With ``through_guard``: the guard the target answers behind."""
    calls: list[tuple[str, ChatResult | ScoreResult]] = field(default_factory=list)

    def options(self, strategy: str) -> dict[str, Any]:
        """The recipe's ``options`` of ``strategy`` (for strategies registered from outside)."""
        return dict(self.config.options.get(strategy, {}))

    async def target(self, messages: Messages) -> str:
        """The target group's answer to ``messages``."""
        cfg = self.config
        request = ChatRequest(messages, max_tokens=cfg.max_tokens, temperature=cfg.temperature, seed=cfg.seed)
        if self.guard is not None:
            text, answer, _, _ = await guarded_answer(self.guard, cfg.target, list(messages), request)
            if answer is not None:
                self.calls.append(("target", answer))
            return text.strip()
        result = await self.engine.chat(cfg.target, request)
        self.calls.append(("target", result))
        return result.text.strip()

    async def attacker(self, messages: Messages) -> str:
        """The attacker group's answer to ``messages``."""
        cfg = self.config
        result = await self.engine.chat(cfg.attacker, ChatRequest(
            messages, max_tokens=cfg.attacker_max_tokens, temperature=cfg.temperature, seed=cfg.seed))
        self.calls.append(("attacker", result))
        return result.text.strip()

    async def _score(self, conversation: Messages, answer: str, question: str) -> float | None:
        request = ScoreRequest([{"role": "user", "content": single_response_prompt(conversation, answer, question)}],
                               answer_prefix=ANSWER_PREFIX)
        try:
            result = await self.engine.score(self.config.judge_role, request)
        except NoChoiceFound:
            return None
        self.calls.append(("judge", result))
        return result.probs["A"]

    async def judge(self, conversation: Messages, answer: str) -> Verdict:
        """The verdict on ``answer`` to ``conversation`` (which ends with the user turn it answers): the refusal
        rule, then (unless refused, see ``judge_refusals``) every principle's judge, asked together."""
        refused = refused_by_rule(answer)
        names = [p.name for p in self.principles.principles]
        if refused and not self.config.judge_refusals:
            return Verdict(True, dict.fromkeys(names), (), False)
        questions = [p.question for p in self.principles.principles]
        outcomes = await gather_calls([partial(self._score, conversation, answer, q) for q in questions],
                                      together=True)
        errors = [o for o in outcomes if isinstance(o, Exception)]
        if errors:
            raise errors[0]
        scores = {name: o if isinstance(o, float) else None for name, o in zip(names, outcomes, strict=True)}
        flagged = tuple(name for name, p in scores.items() if p is not None and p < self.config.flag_below)
        success = not refused and (bool(flagged) or self.seed.harmful is True)
        return Verdict(refused, scores, flagged, success)

    def usage(self) -> dict[str, Any]:
        """Calls by role, tokens and dollars of the calls made so far (a cached call costs nothing)."""
        prices = {state.name: state.config for role in {r for r, _ in self.calls}
                  for state in self.engine.group(self._group(role))}
        cost = sum(prices[r.endpoint].cost(r.usage.prompt_tokens, r.usage.completion_tokens)
                   for _, r in self.calls if not r.cached and r.endpoint in prices)
        count = {role: sum(1 for r, _ in self.calls if r == role) for role in ("target", "attacker", "judge")}
        return {
            "target_calls": count["target"], "attacker_calls": count["attacker"], "judge_calls": count["judge"],
            "prompt_tokens": sum(r.usage.prompt_tokens for _, r in self.calls),
            "completion_tokens": sum(r.usage.completion_tokens for _, r in self.calls),
            "cached_calls": sum(1 for _, r in self.calls if r.cached),
            "cost_usd": round(cost, 8),
        }

    def _group(self, role: str) -> str:
        cfg = self.config
        return {"target": cfg.target, "attacker": cfg.attacker, "judge": cfg.judge_role}[role]
