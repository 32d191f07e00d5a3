"""The critique → revision step, shared by the SL-CAI chains (``stages/sl.py``) and the guard's inference-time
revision: ask the critic for a critique under one principle, then the reviser for a revision, and strip the
wrapper text small models put around a revision ("Sure, here is the revised response:", the revision request
quoted back, surrounding quotes). The caller records that cleaning happened; nothing is silent.

With quality gates (:mod:`cai_async.gates`, ``RevisionSettings.gates``) a revision that copies its critique,
restates a request, is the text it revises, loops, is cut at ``max_tokens`` or talks about "the last response"
is tried once more (another seed), and when that fails too the step keeps the previous response: its record
says which gate failed, with the number, and keeps the rejected texts."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from backends.errors import BudgetExceeded, CaiError, InvalidAnswer
from backends.types import ChatRequest, ChatResult
from cai_async.constitution import Principle
from cai_async.engine import Engine
from cai_async.gates import GateConfig, GateReport, check_revision
from cai_async.store import call_fields

__all__ = [
    "NO_ISSUES_PATTERN",
    "EmptyResponse",
    "Reviser",
    "RevisionSettings",
    "StepFailed",
    "clean_revision",
]

_LEAD_INS = [
    re.compile(p, re.IGNORECASE)
    for p in (
        r"^(?:sure|certainly|of course|okay|ok|absolutely)\b[,.!]*\s*(?=here|below|this is|i(?:'ve| have) )",
        r"^i(?:'ve| have) (?:revised|rewritten|edited|updated|amended)\b[^:\n]{0,80}:\s*",
        r"^(?:here(?:'s| is)|below is|this is)\s+(?:a|an|the|my)?\s*(?:revised|rewritten|new|updated|improved|"
        r"edited|amended|modified|safer|better)\b[^:\n]{0,80}:\s*",
        r"^(?:revised|rewritten|new|updated|improved|edited|amended)\s+(?:response|answer|version|reply|text)"
        r"\s*:\s*",
        r"^(?:revision|response|answer|assistant)\s*:\s*",
        r"^[^\n]{0,200}?\b(?:revised|rewritten|updated|improved|amended|edited) (?:version|response|answer|reply)"
        r"\b[^\n:]{0,40}:\s*",
    )
]
_QUOTES = {'"': '"', "“": "”", "'": "'"}

NO_ISSUES_PATTERN = (
    r"\b(?:no (?:further )?(?:changes?|revisions?|edits?|issues?|problems?|concerns?) (?:are |is )?"
    r"(?:needed|required|necessary|found)|nothing (?:to (?:fix|change|revise|improve)|harmful)|"
    r"(?:does not|doesn't) (?:contain|include) anything (?:harmful|inappropriate|problematic))"
)
"""Default early-stop rule: the critique says the response needs no change."""


def _strip_request(text: str, request: str) -> tuple[str, bool]:
    """Drop a first line that repeats the revision request (possibly prefixed "Revision request:")."""
    first, _, rest = text.partition("\n")
    label = re.sub(r"^(?:revision request|request)\s*:\s*", "", first.strip(), flags=re.IGNORECASE)
    if rest.strip() and label and (label.lower() in request.lower() or request.lower() in label.lower()):
        return rest.lstrip(), True
    return text, False


def clean_revision(text: str, revision_request: str) -> tuple[str, bool]:
    """The revision without wrapper text, and whether anything was removed."""
    original = text
    text = text.strip()
    text, _ = _strip_request(text, revision_request)
    changed = True
    while changed:
        changed = False
        for pattern in _LEAD_INS:
            stripped = pattern.sub("", text, count=1)
            if stripped != text:
                text, changed = stripped.lstrip(), True
    if len(text) >= 2 and text[0] in _QUOTES and text.endswith(_QUOTES[text[0]]) and text.count(text[0]) <= 2:
        text = text[1:-1].strip()
    return text, text != original.strip()


class EmptyResponse(InvalidAnswer):
    """An endpoint answered with no text for a step that needs some (endpoint-side: a rerun retries it)."""


class StepFailed(CaiError):
    """A step of a chain failed with ``error``; ``step`` names it (initial, critique, revision)."""

    def __init__(self, step: str, error: CaiError):
        super().__init__(f"the {step} step failed: {error}")
        self.step = step
        self.error = error


@dataclass(frozen=True, kw_only=True)
class RevisionSettings:
    """Who critiques and who revises, with what limits; ``stop_pattern`` (a regex) ends a chain early when the
    critique matches it; ``teach`` asks the critique request with the principle's good/bad examples."""

    critic_role: str
    revision_role: str
    critique_max_tokens: int = 128
    revision_max_tokens: int = 128
    temperature: float = 0.0
    seed: int | None = 0
    teach: bool = False
    clean: bool = True
    stop_pattern: str | None = None
    gates: GateConfig | None = None
    """Revision quality gates; None (or ``enabled: false``): every revision is taken as it comes."""


class Reviser:
    """Runs critique → revision steps through the engine; ``prefix`` (system prompt, few-shot turns) goes
    before every request."""

    def __init__(self, engine: Engine, settings: RevisionSettings, prefix: list[dict[str, str]] | None = None):
        self.engine = engine
        self.settings = settings
        self.prefix = list(prefix or [])
        self.stop_rule = re.compile(settings.stop_pattern, re.IGNORECASE) if settings.stop_pattern else None

    async def chat(self, step: str, role: str, messages: list[dict[str, str]], max_tokens: int, *,
                   temperature: float | None = None, seed: int | None = None) -> ChatResult:
        """One call of ``step`` (at the settings' temperature and seed unless given); a failure (or an empty
        answer) is raised as :class:`StepFailed`, except a spent budget, which stops the run."""
        request = ChatRequest(
            messages, max_tokens=max_tokens,
            temperature=self.settings.temperature if temperature is None else temperature,
            seed=self.settings.seed if seed is None else seed,
        )
        try:
            result = await self.engine.chat(role, request)
        except BudgetExceeded:
            raise
        except CaiError as exc:
            raise StepFailed(step, exc) from None
        if not result.text.strip():
            raise StepFailed(step, EmptyResponse(
                f"endpoint {result.endpoint!r} (model {result.model!r}) answered the {step} step with empty text "
                f"(finish_reason={result.finish_reason!r}); check the model and its max_tokens"
            ))
        return result

    async def revise_step(
        self, number: int, principle: Principle, conversation: list[dict[str, str]], current: str,
        record: dict[str, Any], results: list[ChatResult],
    ) -> str | None:
        """One critique → revision step under ``principle``, appended to ``record["rounds"]``; the revised text,
        or None when the critique found nothing to fix (early stop: ``early_stop`` is set) or the gates rejected
        the revision (``gate`` names the failed gate): the caller keeps the previous response."""
        cfg = self.settings
        request = principle.critique_request(teach=cfg.teach)
        asked = [*self.prefix, *conversation, {"role": "assistant", "content": current},
                 {"role": "user", "content": request}]
        critique = await self.chat("critique", cfg.critic_role, asked, cfg.critique_max_tokens)
        results.append(critique)
        step: dict[str, Any] = {
            "round": number, "principle": principle.name, "critique_request": request,
            "critique": critique.text.strip(), "revision_request": principle.revision, "revision": None,
            "revision_raw": None, "cleaned": False, "early_stop": False,
            **call_fields("critique", critique), **call_fields("revision", None),
            "gate": None, "gate_value": None, "gate_attempts": 0, "gates_first": None, "gates_retry": None,
            "rejected": None,
        }
        record["rounds"].append(step)
        if self.stop_rule is not None and self.stop_rule.search(critique.text):
            step["early_stop"] = True
            return None
        asked += [{"role": "assistant", "content": critique.text.strip()},
                  {"role": "user", "content": principle.revision}]
        gates = cfg.gates if cfg.gates is not None and cfg.gates.enabled else None
        text, report = await self._revision(number, principle, asked, step, results, gates, current, conversation)
        if report is None or report.passed or gates is None:
            return text
        rejected = [text]
        if gates.retry:
            seed = None if cfg.seed is None else cfg.seed + 1
            temperature = cfg.temperature if cfg.temperature > 0 else gates.retry_temperature
            text, report = await self._revision(number, principle, asked, step, results, gates, current,
                                                conversation, temperature=temperature, seed=seed)
            assert report is not None
            step["gates_retry"] = report.failed_gates
            if report.passed:
                step["rejected"] = rejected
                return text
            rejected.append(text)
        failed = report.failed
        assert failed is not None
        step.update(revision=None, gate=failed.gate, gate_value=failed.number, rejected=rejected)
        return None

    async def _revision(
        self, number: int, principle: Principle, asked: list[dict[str, str]], step: dict[str, Any],
        results: list[ChatResult], gates: GateConfig | None, current: str, conversation: list[dict[str, str]], *,
        temperature: float | None = None, seed: int | None = None,
    ) -> tuple[str, GateReport | None]:
        """One revision call, cleaned and recorded in ``step`` (an attempt counted in ``gate_attempts``); the text
        and, with ``gates``, their report."""
        cfg = self.settings
        revision = await self.chat("revision", cfg.revision_role, asked, cfg.revision_max_tokens,
                                   temperature=temperature, seed=seed)
        results.append(revision)
        raw = revision.text.strip()
        text, cleaned = clean_revision(raw, principle.revision) if cfg.clean else (raw, False)
        step.update(revision=text, revision_raw=raw, cleaned=cleaned, gate_attempts=step["gate_attempts"] + 1,
                    **call_fields("revision", revision))
        if not text:
            raise StepFailed("revision", EmptyResponse(
                f"round {number} ({principle.name}): the revision is empty once wrapper text is removed "
                f"({raw[:80]!r}); set sl.clean_revisions=false to keep it raw, or use a stronger model"
            ))
        if gates is None:
            return text, None
        prompt = next((m["content"] for m in reversed(conversation) if m["role"] == "user"), "")
        report = check_revision(
            text, critique=step["critique"], revised=current, prompt=prompt,
            requests={"the critique request": step["critique_request"], "the revision request": principle.revision},
            finish_reason=revision.finish_reason, config=gates,
        )
        if step["gates_first"] is None:
            step["gates_first"] = report.failed_gates
        return text, report
