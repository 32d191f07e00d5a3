"""Recipes: the run configuration (engine + stages) and the runner: a loop over the stage registry
(:mod:`cai_async.stages.unit`), in its order."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from contextlib import AbstractAsyncContextManager, nullcontext
from itertools import groupby
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from backends.deprecation import OVERRIDES, renamed_keys
from backends.errors import ConfigError, RunStopped
from cai_async.configio import apply_overrides, read_mapping, validate
from cai_async.engine import ALWAYS_USED, Engine, EngineConfig
from cai_async.evaluation.run import EvalConfig
from cai_async.evaluation.stage import run_eval_stage
from cai_async.exitcodes import leaves
from cai_async.guard.config import GuardConfig
from cai_async.scale import Executor, RayConfig, executor_scope
from cai_async.stages.generate import GenerateConfig
from cai_async.stages.rl import RLConfig, run_rl_stage
from cai_async.stages.sl import SLConfig, run_sl_stage
from cai_async.stages.unit import (
    StageContext,
    StageResult,
    StageUnit,
    resolve_path,
    stage_unit,
    stage_units,
    unmet_inputs,
)
from cai_async.store import write_json
from cai_async.train.config import TrainConfig

__all__ = [
    "METHOD_KEYS",
    "RLConfig",
    "Recipe",
    "check_inputs",
    "lift_method_keys",
    "load_recipe",
    "run_eval_stage",
    "run_recipe",
    "run_rl_stage",
    "run_sl_stage",
]

METHOD_KEYS: dict[str, tuple[str, str]] = {
    "constitution": ("sl", "constitution"),
    "num_revisions": ("sl", "num_revisions"),
    "principle_weights": ("sl", "principle_weights"),
    "sl_epochs": ("train", "sl_epochs"),
    "rl_algorithm": ("train", "rl_algorithm"),
    "rl_learning_rate": ("train", "rl_learning_rate"),
}
"""The method's own configuration keys, accepted at a recipe's top level as aliases of their nested homes."""


RENAMED_SECTIONS = {"rl": "label"}
"""Recipe sections by their old key: still read, with one line saying the new one."""


def renamed_sections(data: dict[str, Any], *, source: str, replace: bool = False) -> dict[str, Any]:
    """``data`` with each old section key of :data:`RENAMED_SECTIONS` moved to its new key (one line says so).
    Both keys given is an error, unless ``replace`` (command-line overrides: the old key's values are laid over
    the new section's)."""
    try:
        moved: dict[str, Any] = renamed_keys(data, RENAMED_SECTIONS, where=source, context={OVERRIDES: replace})
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return dict(moved)


def lift_method_keys(data: dict[str, Any], *, source: str, replace: bool = False) -> dict[str, Any]:
    """Move the top-level :data:`METHOD_KEYS` to their sections, and old section keys to their new ones. A key
    given both ways is an error naming both, unless ``replace`` (command-line overrides, which win over the
    file)."""
    result = renamed_sections(data, source=source, replace=replace)
    for alias, (section, key) in METHOD_KEYS.items():
        if alias not in result:
            continue
        value = result.pop(alias)
        home = dict(result.get(section) or {})
        if key in home and not replace:
            raise ConfigError(f"{source}: {alias} and {section}.{key} are both given; keep one of them")
        home[key] = value
        result[section] = home
    return result


class Recipe(BaseModel):
    """A run: where it writes, the engine's endpoints and policies, and the stages to run."""

    model_config = ConfigDict(extra="allow")  # only for registered stages' sections: see _registered_stages

    run_dir: str = "runs/default"
    retry_errors: bool = False
    """Rerun every row recorded with an error (by default only endpoint-side ones: invalid answers, no logprobs)."""
    engine: EngineConfig = Field(default_factory=EngineConfig)
    generate: GenerateConfig | None = None
    sl: SLConfig | None = None
    label: RLConfig | None = None
    """RL-CAI labelling (``cai label``): pairs, AI-feedback labels, dpo/reward exports (``rl``: its old key)."""
    train: TrainConfig | None = None
    eval: EvalConfig | None = None
    guard: GuardConfig | None = None
    """The inference-time guard (``cai guard serve``); not a stage ``cai run`` runs."""
    executor: Executor = "local"
    """Where the stages' items run: this process's engine, or ``ray``: Ray Data pipelines over engine actors."""
    ray: RayConfig = Field(default_factory=RayConfig)
    """With ``executor: ray``: the cluster, the actors and how they share limits and the cache."""

    @property
    def rl(self) -> RLConfig | None:
        """The labelling section by its old name (read-only; the key is ``label``)."""
        return self.label

    @model_validator(mode="wrap")
    @classmethod
    def _registered_stages(cls, data: Any, handler: Callable[[Any], Recipe]) -> Recipe:
        """A section of a stage registered from outside (not a field here) validates into its unit's config type;
        any other unknown key is an error, as with ``extra="forbid"``; every problem is reported at once."""
        if not isinstance(data, dict):
            return handler(data)
        data = renamed_sections(dict(data), source="a recipe")
        errors: list[InitErrorDetails] = []
        for key, value in list(data.items()):
            if key in cls.model_fields:
                continue
            unit = stage_unit(key)
            if key == "loop":
                errors.append({"type": PydanticCustomError(
                    "loop_section", "the loop section is for `cai loop RECIPE` (red-team, retrain, re-measure in "
                    "rounds); run this recipe with it, or remove the section"), "loc": (key,), "input": data.pop(key)})
            elif unit is None:
                errors.append({"type": "extra_forbidden", "loc": (key,), "input": data.pop(key)})
            elif value is not None and not isinstance(value, unit.config_type):
                try:
                    data[key] = unit.config_type.model_validate(value)
                except ValidationError as exc:
                    errors += _details(exc, key)
                    data.pop(key)
        try:
            recipe = handler(data)
        except ValidationError as exc:
            if not errors:
                raise
            errors = [*_details(exc), *errors]
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return recipe


def _details(error: ValidationError, *prefix: str) -> list[InitErrorDetails]:
    """The errors of ``error`` (type and message kept) with their locations under ``prefix``."""
    return [{"type": PydanticCustomError(e["type"], e["msg"]), "loc": (*prefix, *e["loc"]), "input": e["input"]}
            for e in error.errors()]


def load_recipe(path: str | Path | None, overrides: Iterable[str] = (), *, without: Iterable[str] = ()) -> Recipe:
    """Defaults → recipe file → ``key=value`` overrides. Relative file paths written in the recipe (inputs,
    constitution) resolve against the recipe's folder; ``run_dir`` stays relative to where the command runs.
    ``without``: top-level sections another command reads (``cai loop``'s ``loop``), left out."""
    data = lift_method_keys(read_mapping(path), source=str(path)) if path is not None else {}
    for key in without:
        data.pop(key, None)
    recipe = validate(Recipe, data, source=str(path) if path is not None else "defaults")
    if path is not None:
        base = Path(path).parent
        for unit in stage_units():
            config = unit.config(recipe)
            if config is not None:
                unit.resolve(config, base)
        if recipe.guard is not None:  # its principles and constitution files, like the stages' (run paths stay)
            recipe.guard.principles = resolve_path(base, recipe.guard.principles)
            recipe.guard.constitution = resolve_path(base, recipe.guard.constitution)
    if overrides:
        data = apply_overrides(recipe.model_dump(mode="json"), overrides)
        recipe = validate(Recipe, lift_method_keys(data, source=str(path), replace=True), source=str(path),
                          context={OVERRIDES: True})
    return recipe


def check_inputs(recipe: Recipe) -> None:
    """Check the recipe end to end before any call: every stage entry's inputs (prompt files, exports, SL
    chains, a reward model, installed packages) are written by an earlier entry of the recipe or already there.
    A :class:`ConfigError` names the first entry, what it lacks and how to fix it (and how many more lack
    something), so nothing is spent on stages whose successors cannot run."""
    present = [(unit, config) for unit in stage_units() if (config := unit.config(recipe)) is not None]
    problems = unmet_inputs(present, Path(recipe.run_dir))
    if not problems:
        return
    more = len(problems) - 1
    if more:
        rest = "; ".join(line.split("; ")[0] for line in problems[1:4]) + ("; …" if more > 3 else "")
        raise ConfigError(f"{problems[0]} (and {more} more: {rest})")
    raise ConfigError(problems[0])


async def run_recipe(
    recipe: Recipe,
    *,
    progress: Callable[[Engine, str], AbstractAsyncContextManager[Any]] | None = None,
    reports: dict[str, StageResult] | None = None,
) -> dict[str, Any]:
    """Run the recipe's stages in the registry's order; write ``config.yaml`` (no secrets: keys are named by
    variable) and ``summary.json`` into the run directory; return the summary. First :func:`check_inputs`:
    a stage whose inputs cannot exist stops the run before any call. ``reports``: filled with each entry's
    report (:class:`~cai_async.stages.unit.StageResult`: failures, stopped early) as the entry finishes."""
    check_inputs(recipe)
    run_dir = Path(recipe.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(
        yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False), encoding="utf-8"
    )
    summary: dict[str, Any] = {"run_dir": str(run_dir), "started": time.time(), "stages": {}}
    from cai_async.plan import plan_recipe

    summary["plan"] = plan_recipe(recipe)["total"]  # the estimate, beside what the engine accounts below
    present = [(unit, config) for unit in stage_units() if (config := unit.config(recipe)) is not None]
    try:
        for session, group in groupby(present, key=lambda pair: pair[0].session):
            await _run_session(recipe, run_dir, summary, progress, session, list(group), present,
                               {} if reports is None else reports)
    except BaseException as exc:  # group down, refused key: say in summary.json where and why the run stopped
        stopped = next((leaf for leaf in leaves(exc) if isinstance(leaf, RunStopped)), None)
        if stopped is not None:
            summary["stopped"] = {"stage": summary.get("running"), "reason": str(stopped),
                                  "class": type(stopped).__name__}
        raise
    finally:
        summary.pop("running", None)
        summary["finished"] = time.time()
        write_json(run_dir / "summary.json", summary)
    return summary


def _usage(engine: Engine) -> dict[str, Any]:
    accounting = engine.accounting
    return {"calls": sum(s.calls for s in accounting.endpoints.values()), "cache_hits": accounting.cache_hits,
            "tokens": accounting.tokens, "cost_usd": accounting.cost_usd}


Present = list[tuple[StageUnit[Any], Any]]


def _session_engine(config: EngineConfig, session: str, group: Present, present: Present) -> EngineConfig:
    """The engine of one session has every group but those only later stages name and that may not exist yet
    (a model the run trains: :meth:`StageUnit.late_groups`)."""
    used = set(ALWAYS_USED).union(*(unit.roles(c) for unit, c in group))
    late = set[str]().union(*(unit.late_groups(c) for unit, c in present if unit.session != session))
    if not late - used:
        return config
    return config.model_copy(update={"groups": {k: v for k, v in config.groups.items() if k not in late - used}})


async def _run_session(
    recipe: Recipe,
    run_dir: Path,
    summary: dict[str, Any],
    progress: Callable[[Engine, str], AbstractAsyncContextManager[Any]] | None,
    session: str | None,
    group: Present,
    present: Present,
    reports: dict[str, StageResult],
) -> None:
    """Run consecutive stages of one session: in one engine (its summary under ``engine`` for the data session,
    ``engine_<session>`` for another), or without one; each entry's report (into ``reports``) and its
    ``summary.json`` entry, with the calls, tokens and dollars it spent, under its name."""
    if session is None:
        context = StageContext(run_dir=run_dir, recipe=recipe, retry_errors=recipe.retry_errors)
        for unit, config in group:
            for entry in unit.entries(config):
                summary["running"] = entry
                reports[entry] = await unit.run(context, config, entry)
                summary["stages"][entry] = reports[entry].to_json()
        return
    engine_config = _session_engine(recipe.engine, session, group, present)
    async with Engine(engine_config, run_dir=run_dir) as engine, \
            executor_scope(recipe.executor, recipe.ray, engine, run_dir) as executor:
        context = StageContext(run_dir=run_dir, recipe=recipe, engine=engine, executor=executor,
                               retry_errors=recipe.retry_errors)
        try:
            for unit, config in group:
                for entry in unit.entries(config):
                    summary["running"] = entry
                    async with progress(engine, entry) if progress is not None else nullcontext():
                        before = _usage(engine)
                        report = reports[entry] = await unit.run(context, config, entry)
                        after = _usage(engine)
                        data = report.to_json()
                        data["usage"] = {key: round(after[key] - before[key], 6) for key in after}
                        summary["stages"][entry] = data
        finally:
            summary["engine" if session == "data" else f"engine_{session}"] = engine.summary()
