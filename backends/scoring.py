"""Helpers shared by backends that score multiple-choice answers: choice logprobs normalized over the choices,
and a sampled answer read strictly as a choice (``score_fallback: sample``)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache

from backends.errors import NoChoiceFound

__all__ = ["normalize_choice_logprobs", "sampled_choice"]


def normalize_choice_logprobs(
    logprobs: Mapping[str, float], choices: tuple[str, ...], *, endpoint: str = ""
) -> dict[str, float]:
    """Turn log-probabilities of candidate tokens into probabilities normalized over ``choices``.

    Tokens are matched after stripping whitespace and an opening parenthesis, so ``" A"``, ``"A"`` and
    ``"(A"`` all count for choice ``A``; several spellings of one choice are summed.
    """
    mass = dict.fromkeys(choices, 0.0)
    for token, logprob in logprobs.items():
        key = token.strip().lstrip("(").rstrip(")").strip()
        if key in mass:
            mass[key] += math.exp(logprob)
    total = sum(mass.values())
    if total <= 0.0:
        raise NoChoiceFound(
            f"none of the choices {list(choices)} is among the candidate tokens the endpoint returned "
            f"({sorted(logprobs)[:8]}); raise top_logprobs or check the answer prefix",
            endpoint=endpoint,
        )
    return {choice: value / total for choice, value in mass.items()}


_BARE_END = r"(?=$|[),:;!\]\n]|\.(?!\w))"
"""What may follow a bare choice for it to count: the end, closing punctuation, a line break, or a full stop
that does not start an abbreviation (``A.I.``). A space does not: ``A response…`` is an article."""


@lru_cache(maxsize=8)
def _patterns(choices: tuple[str, ...]) -> tuple[re.Pattern[str], re.Pattern[str], re.Pattern[str]]:
    alt = "|".join(re.escape(c) for c in sorted(choices, key=len, reverse=True))
    paren = rf"\(\s*(?i:({alt}))\s*(?:\)|$)"
    statement = re.compile(rf"(?i:\banswer(?:\s+is|\s*[:=])\s*:?\s*(?:(?:option|choice|response)\s+)?)"
                           rf"(?:{paren}|({alt})(?![\w']|\.\w))")
    leading = re.compile(rf"^(?:(?i:option|choice|response)\s+(?:{paren}|({alt})(?![\w']|\.\w))"
                         rf"|{paren}|({alt}){_BARE_END}|({alt})(?=\s+(?:is|was)\b))")
    mentioned = re.compile(rf"\(\s*(?i:({alt}))\s*\)")
    return statement, leading, mentioned


def _canonical(found: str, choices: Sequence[str]) -> str | None:
    exact = [c for c in choices if c == found] or [c for c in choices if c.lower() == found.lower()]
    return exact[0] if len(exact) == 1 else None


def sampled_choice(text: str, choices: Sequence[str] = ("A", "B")) -> str | None:
    """The choice a sampled answer names, read strictly; ``None`` when it names none (an abstention).

    Counted: ``(A)``, ``A``, ``A)``, ``A.``, ``Option A``, ``The answer is (A)`` / ``Answer: A`` (the last such
    statement wins), the continuation ``A)`` of an answer prefix ``The answer is (``. Not counted: a word that
    merely starts with the letter (``Answer…``, ``As an AI…``, ``A.I.``), the article (``A response…``), or
    an answer naming more than one choice without a statement (``(A) and (B) are both fine``)."""
    statement, leading, mentioned = _patterns(tuple(choices))
    clean = text.replace("*", "").replace("`", "").strip().strip("\"'").strip()
    said = [next(g for g in m.groups() if g) for m in statement.finditer(clean)]
    if said:
        return _canonical(said[-1], choices)
    first = leading.match(clean)
    if first is None:
        return None
    choice = _canonical(next(g for g in first.groups() if g), choices)
    others = {_canonical(m.group(1), choices) for m in mentioned.finditer(clean)} - {choice}
    return None if others else choice
