"""``cai plan`` of a loop recipe: the calls, tokens and dollars of the held-out baseline (once) and of one round
(red-team, near-misses, SL-CAI and labels, held-out attacks, evaluation), and of ``loop.rounds`` rounds in all.

Each step is planned by the stages' own planners on the section the loop will run, so the estimate follows
them. Upper bounds where the loop learns its sizes only as it runs: every attack is taken to succeed (so a round's
SL prompts are ``max_attack_prompts`` plus the replay share, counted on the recipe's ``sl.input`` texts), every
attacked behaviour gets a near-miss, outputs run to ``max_tokens``."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from cai_async.loop.config import TRAINED_GROUP, LoopConfig, loop_eval_config
from cai_async.loop.data import (
    fresh_seeds,
    near_miss_role,
    pick_heldout,
    seed_file_redteam,
    seed_pool,
    write_seed_file,
)
from cai_async.plan import SUMMED, plan_recipe, plan_row, token_counter
from cai_async.recipes import Recipe
from cai_async.redteam.config import RedteamConfig
from cai_async.redteam.stage import attempt_items
from cai_async.stages.unit import Count, StagePlan

__all__ = ["plan_loop"]

def _section_plan(recipe: Recipe, step: str, counter: tuple[Count, str], **sections: Any) -> list[dict[str, Any]]:
    planned = plan_recipe(Recipe.model_validate({"run_dir": recipe.run_dir, "engine": recipe.engine, **sections}),
                          counter=counter)
    return [{**row, "stage": f"{step}/{row['stage']}"} for row in planned["stages"]]


def _attacks(recipe: Recipe, step: str, config: RedteamConfig, guarded: bool,
             counter: tuple[Count, str]) -> list[dict[str, Any]]:
    rows = _section_plan(recipe, step, counter, redteam=config)
    if guarded:  # the same attacks behind the guard (its own judge calls come on top: see the notes)
        rows += [{**row, "stage": f"{row['stage']} behind the guard",
                  "notes": [*row["notes"], "the guard's own checks are not counted"]} for row in rows]
    return rows


def plan_loop(recipe: Recipe, loop: LoopConfig) -> dict[str, Any]:
    """Estimated calls, tokens and dollars: ``start`` rows (the held-out baseline, once), ``round`` rows (one
    round), and the total over the baseline and ``loop.rounds`` rounds. The seeds are drawn as the loop draws
    them (the held-out set, then round 0's fresh seeds)."""
    redteam: RedteamConfig = recipe.redteam  # type: ignore[attr-defined]  # a registered stage's section
    guarded = recipe.guard is not None and loop.attack_guarded
    counter = token_counter(recipe)  # once for every section planned
    pool = seed_pool(redteam)
    heldout_seeds = pick_heldout(pool, loop.heldout, seed=loop.seed)
    round_seeds = fresh_seeds(pool, heldout_seeds, set(), loop, redteam, round_index=0)
    with tempfile.TemporaryDirectory() as folder:
        heldout = seed_file_redteam(redteam, write_seed_file(Path(folder) / "heldout.jsonl", heldout_seeds),
                                    redteam.target, loop.heldout_strategies)
        fresh = seed_file_redteam(redteam, write_seed_file(Path(folder) / "seeds.jsonl", round_seeds),
                                  redteam.target)
        start = _attacks(recipe, "start", heldout, guarded, counter)
        rows = _attacks(recipe, "round", fresh, guarded, counter)
    attempts = len(attempt_items(fresh, round_seeds))
    if loop.near_misses:
        role = near_miss_role(redteam, recipe.engine.groups)
        near = StagePlan("round/prompts", role, notes=["one benign near-miss per attacked behaviour"])
        near.add(len(round_seeds), sum(len(s.behaviour) // 4 + 80 for s in round_seeds),
                 len(round_seeds) * loop.near_miss_max_tokens)
        rows.append(plan_row(near, recipe.engine.groups.get(role, [])))
    prompts = min(loop.max_attack_prompts or attempts, attempts)
    if recipe.sl is not None:
        sl = recipe.sl.model_copy(update={"limit": prompts + round(loop.replay * prompts)})
        label = {"label": recipe.label} if recipe.label is not None else {}
        rows += _section_plan(recipe, "round", counter, sl=sl, **label)
    for row in start:  # the held-out attacks again, on the round's trained model (in this process: free)
        again = {**row, "stage": row["stage"].replace("start/redteam", "round/heldout", 1)}
        if row["group"] == heldout.target:
            again.update(group=TRAINED_GROUP, cost_usd=0.0, cost_usd_online=0.0, cost_usd_batch=0.0,
                         notes=[*row["notes"], "the round's trained model, in this process"])
        rows.append(again)
    rows += _section_plan(recipe, "round", counter, eval=loop_eval_config(recipe, loop, 0))
    total = {key: round(sum(r[key] for r in start) + loop.rounds * sum(r[key] for r in rows), 4) for key in SUMMED}
    return {"stages": [*start, *rows], "total": total, "rounds": loop.rounds,
            "method": f"the baseline once and {loop.rounds} round(s); every attack taken to succeed "
                      f"({prompts} SL prompts a round); outputs at max_tokens (upper bound)"}
