"""The ``redteam`` recipe section: seeds, strategies, the groups it calls (target, judge, attacker) and what each
strategy needs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from cai_async.engine.config import JUDGE
from cai_async.prompts import PromptSource

__all__ = ["ENCODINGS", "MUTATIONS", "Encoding", "Mutation", "RedteamConfig", "SeedSet"]

SeedSet = Literal["advbench", "hh_rlhf", "attacker"]
Encoding = Literal["base64", "rot13", "leetspeak", "split"]
ENCODINGS: tuple[Encoding, ...] = ("base64", "rot13", "leetspeak", "split")
Mutation = Literal["generate", "crossover", "expand", "shorten", "rephrase"]
MUTATIONS: tuple[Mutation, ...] = ("generate", "crossover", "expand", "shorten", "rephrase")
"""GPTFuzz's mutation operators (``mutate``)."""


class RedteamConfig(PromptSource):
    """Options of the redteam stage (recipe key ``redteam``, command ``cai redteam``). ``input`` (optional): a
    file of the user's own seed behaviours (its ``harmful_column`` a true/false label; without one every row is
    taken as harmful: a behaviour the target should not carry out)."""

    seeds: list[SeedSet] = Field(default_factory=lambda: list[SeedSet](["advbench"]))
    """Bundled seed behaviours: AdvBench's harmful behaviours (labelled harmful) and/or hh-rlhf's red-team first
    turns (unlabelled: a success there needs a principle's judge to flag the answer); ``attacker``: behaviours the
    attacker group writes for each principle from its text (``per_principle`` each, unlabelled)."""
    per_principle: int = Field(default=3, ge=1)
    """With ``attacker`` in ``seeds``: behaviours written per principle."""
    n: int | None = Field(default=20, ge=1)
    """Seeds drawn from each bundled set (seeded); null: all of them."""
    data_dir: str | None = None
    """A folder with the full public sets (the layout of ``cai_async/data/public``), ``hub``, or null: bundled."""
    harmful_column: str | None = None
    strategies: list[str] = Field(default_factory=lambda: ["direct", "template", "encode", "persona", "multi_turn"])
    """Attack strategies by registered name (:func:`cai_async.redteam.strategy.strategy_names`)."""
    target: str = "policy"
    """The engine group attacked: any group (a bare model, a hosted endpoint, the guard proxy)."""
    through_guard: bool = False
    """Attack ``target`` behind the recipe's ``guard`` section, in process: each answer is what a client of
    ``cai guard serve`` would get (the input check's refusal, or the answer after the output check). The guard's
    own judge calls are paid by the run, not counted on the attempt rows."""
    judge_role: str = JUDGE
    attacker: str = "attacker"
    """The group that writes attacks (``refine``)."""
    principles: str = "harmless"
    """The comparison set whose every principle judges every answer the target did not refuse."""
    flag_below: float = Field(default=0.5, gt=0, lt=1)
    """A principle flags an answer when its judge's P(good) is below this."""
    judge_refusals: bool = False
    """Judge answers the refusal rule already calls refusals (they cannot be successes)."""
    templates: int = Field(default=3, ge=1)
    """GPTFuzz jailbreak templates per seed (``template``), drawn with ``seed``."""
    encodings: list[Encoding] = Field(default_factory=lambda: list(ENCODINGS))
    personas: list[str] | None = None
    """Role-play personas (``persona``) by name; null: every built-in one."""
    turns: int = Field(default=3, ge=1)
    """User turns of a ``multi_turn`` escalation (the last asks for the behaviour itself)."""
    iterations: int = Field(default=3, ge=1)
    """Target calls of a ``refine`` or ``mutate`` attack at most. ``refine``: the first asks directly, each later
    one is the attacker's rewrite from the last answer and its judge scores. ``mutate``: each is one offspring
    template the attacker mutated."""
    mutations: list[Mutation] = Field(default_factory=lambda: list(MUTATIONS), min_length=1)
    """The mutation operators ``mutate`` draws from, one per offspring (drawn with ``seed`` and the attempt)."""
    languages: list[str] = Field(default_factory=lambda: ["Zulu", "Scots Gaelic", "Hmong"], min_length=1)
    """``translate``: the low-resource languages the attacker translates each behaviour into."""
    options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Options of strategies registered from outside, by strategy name."""
    max_tokens: int = Field(default=256, ge=1)
    attacker_max_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=0.0, ge=0)
    seed: int = 0
    shard_rows: int = Field(default=64, ge=1)
