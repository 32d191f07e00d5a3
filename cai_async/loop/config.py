"""The ``loop`` recipe section (``cai loop``): how many rounds, the held-out attack set fixed at round 0, what a
round trains on besides its successful attacks, and when the loop stops; and reading a loop recipe."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import Field

from backends.errors import ConfigError
from backends.strict import StrictModel
from cai_async.configio import apply_overrides, read_mapping, validate
from cai_async.engine.config import JUDGE
from cai_async.evaluation.run import EvalConfig, EvalModel
from cai_async.recipes import Recipe, load_recipe

__all__ = ["LOOP_KEY", "START", "START_GROUP", "TRAINED_GROUP", "LoopConfig", "is_loop_recipe", "load_loop_recipe",
           "loop_eval_config"]

LOOP_KEY = "loop"
"""The recipe section ``cai loop`` reads (``cai run`` ignores a recipe's loop section only through ``cai loop``)."""
START_GROUP = "loop_start"
"""The engine group of the starting policy (the evaluation's baseline in every round)."""
TRAINED_GROUP = "loop_trained"
"""The engine group of the model a round trained (held-out attacks and the evaluation)."""
START = "start"
"""The starting policy's name in each round's evaluation."""


class LoopConfig(StrictModel):
    """Options of ``cai loop`` (recipe key ``loop``). A round red-teams the current policy, trains on what got
    through (SL-CAI, labels, SFT then the recipe's preference stage), and measures the trained model on a held-out
    attack set fixed at round 0 and never trained on."""

    rounds: int = Field(default=1, ge=1)
    """Rounds to run in all (a rerun with more continues from the last finished one)."""
    heldout: int = Field(default=4, ge=1)
    """Seed behaviours drawn at round 0 (seeded) and kept out of every round's attacks and data: the held-out set."""
    heldout_strategies: list[str] | None = None
    """The strategies the held-out set is attacked with each round (default: the redteam section's)."""
    seeds_per_round: int | None = Field(default=None, ge=1)
    """Fresh seed behaviours attacked per round, drawn from those no round has used yet (default: ``redteam.n``)."""
    max_attack_prompts: int | None = Field(default=None, ge=1)
    """At most this many of a round's successful attacks become SL prompts (a seeded draw); null: all of them."""
    replay: float = Field(default=0.25, ge=0, le=1)
    """Earlier rounds' SL prompts added to a round's, as a share of its new ones (so it does not forget them)."""
    near_misses: bool = True
    """The attacker writes one benign look-alike of each successful attack; they join the helpfulness mix (answered,
    not revised), so the policy does not learn to refuse requests that only look like an attack."""
    near_miss_max_tokens: int = Field(default=64, ge=1)
    patience: int = Field(default=1, ge=1)
    """Stop when held-out attack success has not fallen below its best by ``min_drop`` for this many rounds."""
    min_drop: float = Field(default=0.0, ge=0, le=1)
    budget_usd: float | None = Field(default=None, gt=0)
    """Stop (exit 4) before a round when the loop has spent this much (as the engine accounts it)."""
    eval_n: int = Field(default=8, ge=1)
    """XSTest safe/unsafe prompts and helpfulness prompts per round's evaluation (round 0's model vs this round's)."""
    eval_max_tokens: int = Field(default=96, ge=1)
    attack_guarded: bool = True
    """With a recipe guard section: each round's fresh and held-out attacks (and the baseline) are also made on the
    policy behind the guard (in process, answering as ``cai guard serve`` would, with the classifier the last round
    refit), so the report shows what gets past the policy and what gets past the deployed pair."""
    retrain_guard: bool = True
    """With a recipe guard section: refit the guard's classifier on each round's data (``round-K/guard``)."""
    seed: int = 0


def load_loop_recipe(path: str | Path, overrides: Iterable[str] = ()) -> tuple[Recipe, LoopConfig]:
    """The recipe at ``path`` without its loop section, and the loop section; ``overrides`` (``key=value``) go to
    either (``loop.…`` keys to the loop). The recipe must have redteam, sl and train sections."""
    data = read_mapping(path)
    section = data.pop(LOOP_KEY, None) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: loop must be a mapping (rounds, heldout, replay, …)")
    recipe_sets = [o for o in overrides if not o.startswith(f"{LOOP_KEY}.")]
    loop_sets = [o.removeprefix(f"{LOOP_KEY}.") for o in overrides if o.startswith(f"{LOOP_KEY}.")]
    loop = validate(LoopConfig, apply_overrides(section, loop_sets), source=f"{path}: loop")
    recipe = load_recipe(path, recipe_sets, without=(LOOP_KEY,))
    missing = [key for key in ("redteam", "sl", "train") if _section(recipe, key) is None]
    if missing:
        raise ConfigError(f"{path}: cai loop needs {', '.join(missing)} section(s) (a round red-teams, revises and "
                          "trains; see recipes/loop.yaml)")
    assert recipe.train is not None
    if recipe.train.rl_algorithm == "ppo" and "rl" in recipe.train.stages:
        raise ConfigError(f"{path}: cai loop trains in this process: use rl_algorithm dpo, soft_dpo, grpo, rloo or "
                          "online_dpo (PPO runs through OpenRLHF: `cai train rl`)")
    return recipe, loop


def is_loop_recipe(path: str | Path) -> bool:
    """Whether the recipe file at ``path`` has a loop section (``cai loop`` runs it)."""
    return LOOP_KEY in read_mapping(path)


def _section(recipe: Recipe, key: str) -> Any:
    return getattr(recipe, key, None) if key in Recipe.model_fields else (recipe.model_extra or {}).get(key)


def loop_eval_config(recipe: Recipe, loop: LoopConfig, k: int) -> EvalConfig:
    """Round ``k``'s evaluation: XSTest refusals and helpfulness of its trained model against the start."""
    template = recipe.eval
    name = f"round-{k}"
    return EvalConfig(
        models=[EvalModel(name=START, group=START_GROUP), EvalModel(name=name, group=TRAINED_GROUP)],
        suites=["overrefusal", "helpfulness"], n=loop.eval_n, max_tokens=loop.eval_max_tokens,
        ensemble=1, baseline=START, compare=(START, name), seed=loop.seed,
        data_dir=template.data_dir if template is not None else None,
        judge_role=template.judge_role if template is not None else JUDGE)
