"""Seed behaviours to attack: the bundled AdvBench slice (harmful), hh-rlhf red-team first turns (unlabelled)
and/or a user's file (labelled by a column, else taken as harmful)."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from cai_async.public_data import HH_TURNS, read_public
from cai_async.redteam.config import RedteamConfig

__all__ = ["Seed", "load_seeds", "seed_id"]


@dataclass(frozen=True, slots=True)
class Seed:
    """One behaviour: a stable id, the request, whether its own label says it is harmful (None: no label), and
    where it came from."""

    id: str
    behaviour: str
    harmful: bool | None
    source: str


def seed_id(source: str, text: str) -> str:
    """A seed's stable id: its source and a hash of its text."""
    return f"{source}-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:12]}"


def _sample(seeds: list[Seed], n: int | None, seed: int) -> list[Seed]:
    if n is None or n >= len(seeds):
        return seeds
    return sorted(random.Random(seed).sample(seeds, n), key=lambda s: s.id)


def _label(value: object) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "harmful", "unsafe"):
        return True
    if text in ("0", "false", "no", "benign", "safe"):
        return False
    return None


def load_seeds(config: RedteamConfig) -> list[Seed]:
    """The seeds of ``config``, bundled sets first (``n`` each, seeded), then the user's file (``limit`` rows)."""
    seeds: list[Seed] = []
    what = "redteam seeds"
    if "advbench" in config.seeds:
        goals = read_public("advbench/harmful_behaviors.csv", config.data_dir, what=what,
                            columns=("goal",), key="redteam.data_dir")["goal"].to_list()
        seeds += _sample([Seed(seed_id("advbench", g), g, True, "advbench") for g in dict.fromkeys(goals)],
                         config.n, config.seed)
    if "hh_rlhf" in config.seeds:
        turns = read_public(HH_TURNS, config.data_dir, what=what, columns=("prompt",),
                            key="redteam.data_dir")["prompt"].to_list()
        seeds += _sample([Seed(seed_id("hh", t), t, None, "hh-rlhf") for t in dict.fromkeys(turns)],
                         config.n, config.seed)
    if config.input:
        column = config.harmful_column
        for row in config.iter(extra_columns=(column,) if column else ()):
            harmful = _label(dict(row.extra)[column]) if column else True
            seeds.append(Seed(row.id, row.prompt, harmful, "input"))
    return seeds
