"""Constitutions: principles (a critique request and a revision request each), few-shot examples, and how a
principle is drawn for each round of a critique → revision chain."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Generic, Literal, Self, TypeVar

from pydantic import (
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from backends.errors import ConfigError
from backends.strict import StrictModel

__all__ = [
    "ComparisonPrinciple",
    "ComparisonSet",
    "Constitution",
    "ContrastExample",
    "DrawMode",
    "FewShotExample",
    "GuardRules",
    "Principle",
    "draw_passes",
    "draw_principles",
]

DrawMode = Literal["random", "weighted", "priority", "all"]
"""How principles are chosen for a chain: one per round (``random``, ``weighted`` by weight, ``priority`` order),
or ``all``: every enabled principle in each pass, in priority order (the method's revision loop)."""


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


class GuardRules(StrictModel):
    """Cheap input/output filters a principle may carry for the inference-time guard: regular expressions
    (case-insensitive) and whole words; a match is a violation of the principle without asking a judge."""

    model_config = ConfigDict(frozen=True)

    patterns: tuple[str, ...] = ()
    words: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    """The roles whose text the rules read: ``system`` (and ``developer``), ``user``, ``assistant`` (earlier
    turns, and answers), ``tool`` (tool results), ``tools`` (tool definitions offered), ``request`` (other fields of
    the request). Empty: every part of the exchange."""

    @field_validator("patterns")
    @classmethod
    def _compiles(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a valid regular expression: {exc}") from None
        return value

    def match(self, text: str) -> str | None:
        """The first pattern or word found in ``text``, or None."""
        for pattern in self.patterns:
            if re.search(pattern, text, re.IGNORECASE):
                return pattern
        lowered = text.lower()
        for word in self.words:
            if re.search(rf"\b{re.escape(word.lower())}\b", lowered):
                return word
        return None


class ContrastExample(StrictModel):
    """A good and a bad critique of one flawed response, shown to the model (labelled as such) before the
    principle's critique request when few-shot examples are on: what a useful critique looks like."""

    model_config = ConfigDict(frozen=True)

    prompt: str
    response: str
    good: str
    """Specific: quotes the response, names the harm (or the needless refusal) and what to change."""
    bad: str
    """Vague, or only echoes the response."""

    _check_text = field_validator("prompt", "response", "good", "bad")(_not_blank)

    def text(self) -> str:
        """The contrast as plain text, to put before a critique request."""
        return (
            "Here is an example of a good and a bad critique for this kind of request.\n"
            f"Request: {self.prompt}\nResponse: {self.response}\n"
            f"Good critique (specific, quotes the response, names the problem): {self.good}\n"
            f"Bad critique (vague, only echoes the response): {self.bad}\n"
            "Write a critique like the good one, about the last response."
        )


class Principle(StrictModel):
    """One principle: the request that asks for a critique and the request that asks for a revision.

    ``weight`` (≥ 0; 0 disables the principle) is the principle's share: of the draws in ``weighted`` mode, of
    the passes that apply it in ``all`` mode (relative to the heaviest principle). ``priority`` (lower first)
    orders ``priority`` draws and the principles of an ``all`` pass. ``contrast`` is an optional good/bad
    critique pair shown with the critique request when few-shot examples are on."""

    model_config = ConfigDict(frozen=True)
    _renamed_keys: ClassVar[dict[str, str]] = {"critique_request": "critique", "revision_request": "revision"}
    """The CAI paper's names for the two requests (a file written with them is told to rename them)."""

    name: str
    critique: str
    revision: str
    weight: float = Field(default=1.0, ge=0)
    priority: int = 0
    tags: tuple[str, ...] = ()
    contrast: ContrastExample | None = None
    rules: GuardRules | None = None
    """Patterns and words the inference-time guard blocks on without asking a judge."""

    _check_text = field_validator("name", "critique", "revision")(_not_blank)

    def critique_request(self, *, teach: bool = False) -> str:
        """The critique request, after the contrast example when ``teach`` and the principle has one."""
        if teach and self.contrast is not None:
            return f"{self.contrast.text()}\n\n{self.critique}"
        return self.critique


class FewShotExample(StrictModel):
    """A worked critique → revision exchange, put before the real one as prior chat turns. ``context`` holds
    earlier turns of the conversation, for multi-turn examples."""

    model_config = ConfigDict(frozen=True)

    context: tuple[dict[str, str], ...] = ()
    prompt: str
    response: str
    critique_request: str
    critique: str
    revision_request: str
    revision: str

    _check_text = field_validator(
        "prompt", "response", "critique_request", "critique", "revision_request", "revision"
    )(_not_blank)

    def messages(self) -> list[dict[str, str]]:
        """The example as chat turns: the context, then user, assistant, user, assistant, user, assistant."""
        return [
            *(dict(m) for m in self.context),
            {"role": "user", "content": self.prompt},
            {"role": "assistant", "content": self.response},
            {"role": "user", "content": self.critique_request},
            {"role": "assistant", "content": self.critique},
            {"role": "user", "content": self.revision_request},
            {"role": "assistant", "content": self.revision},
        ]


PT = TypeVar("PT", "Principle", "ComparisonPrinciple")


class _PrincipleSet(StrictModel, Generic[PT]):
    """What constitutions and comparison sets share: a name, a version, principles with unique names and at
    least one positive weight, a draw mode, a content hash, and re-weighting."""

    model_config = ConfigDict(frozen=True)
    _hashed: ClassVar[set[str]] = {"draw", "principles"}

    name: str
    version: str = "1"
    description: str = ""
    draw: DrawMode = "random"
    principles: tuple[PT, ...] = Field(min_length=1)

    @field_validator("principles", mode="wrap")
    @classmethod
    def _unique_names(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """Principle names are unique; a repeated name is reported with the principles' other problems (were it
        checked after them, any other problem would hide it)."""
        repeats: list[InitErrorDetails] = []
        seen: set[str] = set()
        for index, item in enumerate(value if isinstance(value, list | tuple) else ()):
            name = item.get("name") if isinstance(item, Mapping) else getattr(item, "name", None)
            if isinstance(name, str) and name in seen:
                problem = PydanticCustomError("duplicate_name", "duplicate principle name {name}", {"name": repr(name)})
                repeats.append(InitErrorDetails(type=problem, loc=(index, "name"), input=name))
            elif isinstance(name, str):
                seen.add(name)
        if not repeats:
            return handler(value)
        try:
            handler(value)
            errors: list[InitErrorDetails] = []
        except ValidationError as exc:  # the items' own problems, kept as they were
            errors = [InitErrorDetails(type=PydanticCustomError(err["type"], err["msg"]),
                                       loc=err["loc"], input=err["input"]) for err in exc.errors()]
        raise ValidationError.from_exception_data(cls.__name__, [*errors, *repeats])

    @model_validator(mode="after")
    def _check(self) -> Self:
        if not any(p.weight > 0 for p in self.principles):
            raise ValueError("every principle has weight 0: give at least one a positive weight")
        return self

    @property
    def content_hash(self) -> str:
        """Stable hash of what shapes the outputs (not the name or description); recorded on every row."""
        payload = self.model_dump(mode="json", include=self._hashed)
        text = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def names(self) -> str:
        return ", ".join(p.name for p in self.principles)

    def principle(self, name: str) -> PT:
        """The principle called ``name``."""
        for principle in self.principles:
            if principle.name == name:
                return principle
        raise ConfigError(f"{self.name!r} has no principle {name!r} (has: {self.names()})")

    def with_weights(self, weights: Mapping[str, float]) -> Self:
        """A copy with some principles' weights replaced (``principle_weights`` in a recipe)."""
        if not weights:
            return self
        unknown = [name for name in weights if name not in {p.name for p in self.principles}]
        if unknown:
            raise ConfigError(
                f"principle_weights: no principle {', '.join(map(repr, unknown))} in {self.name!r} "
                f"(has: {self.names()})"
            )
        data: dict[str, Any] = self.model_dump()
        for principle in data["principles"]:
            if principle["name"] in weights:
                principle["weight"] = float(weights[principle["name"]])
        try:
            return type(self).model_validate(data)
        except ValueError as exc:
            raise ConfigError(f"principle_weights: {exc}") from None


class Constitution(_PrincipleSet[Principle]):
    """A named, versioned set of principles with optional few-shot examples and a draw mode."""

    _hashed: ClassVar[set[str]] = {"draw", "principles", "few_shot"}

    draw: DrawMode = "random"
    few_shot: tuple[FewShotExample, ...] = ()


class ComparisonPrinciple(StrictModel):
    """A principle phrased as a multiple-choice question over two responses ("Which of these responses is
    less harmful…?"), for AI-feedback labels."""

    model_config = ConfigDict(frozen=True)

    name: str
    question: str
    weight: float = Field(default=1.0, ge=0)
    priority: int = 0
    tags: tuple[str, ...] = ()
    rules: GuardRules | None = None
    """Patterns and words the inference-time guard blocks on without asking a judge."""

    _check_text = field_validator("name", "question")(_not_blank)


class ComparisonSet(_PrincipleSet[ComparisonPrinciple]):
    """A named, versioned set of comparison principles; ``weighted`` draws pick the ensemble for each pair."""

    draw: DrawMode = "weighted"

    @field_validator("draw")
    @classmethod
    def _one_per_draw(cls, value: str) -> str:
        if value == "all":
            raise ValueError("comparison sets draw an ensemble of principles: use random, weighted or priority")
        return value


def _weighted_order(pool: Sequence[P], rng: random.Random) -> list[P]:
    """Weighted sampling without replacement (Efraimidis–Spirakis keys u^(1/w))."""
    keyed = [(rng.random() ** (1.0 / p.weight), p) for p in pool]
    keyed.sort(key=lambda pair: pair[0], reverse=True)
    return [p for _, p in keyed]


P = TypeVar("P", Principle, ComparisonPrinciple)


def draw_principles(
    constitution: Constitution | ComparisonSet, rounds: int, *, rng: random.Random, mode: DrawMode | None = None
) -> list[Any]:
    """Principles for ``rounds`` rounds of one chain: no principle repeats until every enabled one was used.

    ``random`` shuffles uniformly, ``weighted`` samples by weight without replacement, ``priority`` goes in
    priority order (lower first, ties in file order). Principles with weight 0 are never drawn."""
    mode = mode or constitution.draw
    pool: list[Any] = [p for p in constitution.principles if p.weight > 0]
    if mode == "all":
        return [p for one_pass in draw_passes(constitution, rounds, rng=rng, mode="all") for p in one_pass]
    drawn: list[Any] = []
    while len(drawn) < rounds:
        if mode == "priority":
            cycle = sorted(pool, key=lambda p: p.priority)
        elif mode == "weighted":
            cycle = _weighted_order(pool, rng)
        else:
            cycle = list(pool)
            rng.shuffle(cycle)
        drawn.extend(cycle[: rounds - len(drawn)])
    return drawn


def draw_passes(
    constitution: Constitution | ComparisonSet, passes: int, *, rng: random.Random, mode: DrawMode | None = None
) -> list[list[Any]]:
    """The principles of each revision pass of one chain. ``all``: every enabled principle in priority order
    (lower first, ties in file order), each kept in a pass with probability weight ÷ the heaviest weight (so
    equal weights apply every principle every pass). Other modes: one principle per pass, as
    :func:`draw_principles` draws them."""
    mode = mode or constitution.draw
    if mode != "all":
        return [[p] for p in draw_principles(constitution, passes, rng=rng, mode=mode)]
    pool = sorted((p for p in constitution.principles if p.weight > 0), key=lambda p: p.priority)
    heaviest = max(p.weight for p in pool)
    return [[p for p in pool if p.weight >= heaviest or rng.random() < p.weight / heaviest] for _ in range(passes)]
