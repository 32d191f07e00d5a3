"""Helpers shared by backends that score multiple-choice answers."""

from __future__ import annotations

import math
from collections.abc import Mapping

from backends.errors import NoChoiceFound

__all__ = ["normalize_choice_logprobs"]


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
