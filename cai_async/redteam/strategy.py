"""Attack strategies: one small unit each, in a registry like the stages'. A :class:`Strategy` names its variants
(an encoding, a template, a persona; one unnamed variant by default), says how many calls one attempt may make
(for ``cai plan``) and runs one attempt through an :class:`~cai_async.redteam.attempt.AttackContext`. A
single-turn strategy only writes the prompt (:class:`SingleTurn`). Built-ins: ``direct``, ``template``,
``encode``, ``persona``, ``multi_turn``, ``refine``, ``mutate``; add one with :func:`register_strategy`."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from backends.errors import ConfigError
from cai_async.redteam.attempt import Attack, AttackContext
from cai_async.redteam.config import RedteamConfig
from cai_async.redteam.seeds import Seed

__all__ = [
    "Calls", "SingleTurn", "Strategy", "register_strategy", "strategy", "strategy_names", "unregister_strategy",
]


@dataclass(frozen=True, slots=True)
class Calls:
    """The most calls one attempt makes on each group (the judge: answers judged, each by every principle)."""

    target: int = 1
    attacker: int = 0
    judged: int = 1


class Strategy(ABC):
    """One attack strategy. Subclasses set ``name`` and implement :meth:`attack`."""

    name: ClassVar[str]
    uses_attacker: ClassVar[bool] = False

    def variants(self, config: RedteamConfig) -> list[str]:
        """The variants an attempt is made with, per seed (default: one, unnamed)."""
        return [""]

    def calls(self, config: RedteamConfig) -> Calls:
        """The most calls an attempt makes (default: one target call, its answer judged)."""
        return Calls()

    @abstractmethod
    async def attack(self, context: AttackContext, seed: Seed, variant: str) -> Attack:
        """Attack ``seed`` with ``variant``."""


class SingleTurn(Strategy):
    """A strategy that rewrites the behaviour into one user message."""

    @abstractmethod
    def prompt(self, seed: Seed, variant: str, config: RedteamConfig) -> str:
        """The message sent to the target."""

    async def attack(self, context: AttackContext, seed: Seed, variant: str) -> Attack:
        """One target call, its answer judged."""
        messages = [{"role": "user", "content": self.prompt(seed, variant, context.config)}]
        answer = await context.target(messages)
        verdict = await context.judge(messages, answer)
        return Attack([*messages, {"role": "assistant", "content": answer}], verdict)


_BUILTIN = ("cai_async.redteam.transforms", "cai_async.redteam.multi_turn", "cai_async.redteam.refine",
            "cai_async.redteam.mutate", "cai_async.redteam.translate")
"""Modules whose ``STRATEGIES`` are registered first, in this order."""
_strategies: dict[str, Strategy] = {}
_loaded = False


def _load() -> dict[str, Strategy]:
    global _loaded
    if not _loaded:
        _loaded = True
        added = dict(_strategies)
        _strategies.clear()
        for module in _BUILTIN:
            for unit in importlib.import_module(module).STRATEGIES:
                _strategies[unit.name] = unit
        for name, unit in added.items():
            if name in _strategies:
                raise ConfigError(f"a strategy named {name!r} is already registered")
            _strategies[name] = unit
    return _strategies


def register_strategy(unit: Strategy) -> None:
    """Add a strategy; its name must be new."""
    registry = _load() if _loaded else _strategies
    if unit.name in registry:
        raise ConfigError(f"a strategy named {unit.name!r} is already registered")
    registry[unit.name] = unit


def unregister_strategy(name: str) -> None:
    """Remove the strategy ``name`` (a no-op when there is none)."""
    _load().pop(name, None)


def strategy_names() -> list[str]:
    """Every registered strategy, built-ins first."""
    return list(_load())


def strategy(name: str) -> Strategy:
    """The strategy registered as ``name``."""
    found = _load().get(name)
    if found is None:
        raise ConfigError(f"unknown attack strategy {name!r} (registered: {', '.join(_load())})")
    return found
