"""Red-teaming: attack strategies (a registry like the stages'), the redteam stage unit and principle-gap
analysis (see README, "Red-teaming")."""

from cai_async.redteam.attempt import Attack, AttackContext, Verdict
from cai_async.redteam.config import RedteamConfig
from cai_async.redteam.gaps import gap_lines, principle_gaps
from cai_async.redteam.seeds import Seed, load_seeds
from cai_async.redteam.strategy import (
    Calls,
    SingleTurn,
    Strategy,
    register_strategy,
    strategy,
    strategy_names,
    unregister_strategy,
)

__all__ = [
    "Attack",
    "AttackContext",
    "Calls",
    "RedteamConfig",
    "Seed",
    "SingleTurn",
    "Strategy",
    "Verdict",
    "gap_lines",
    "load_seeds",
    "principle_gaps",
    "register_strategy",
    "strategy",
    "strategy_names",
    "unregister_strategy",
]
