"""Recipes: the run configuration (engine + stages) and the runner that calls stages in order."""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager, nullcontext
from pathlib import Path
from typing import Any, Literal

import anyio
import polars as pl
import yaml
from pydantic import BaseModel, ConfigDict, Field

from backends.errors import ConfigError, RunStopped
from cai_async.configio import apply_overrides, read_mapping, validate
from cai_async.constitution_io import builtin_comparison_sets, builtin_constitutions
from cai_async.engine import Engine, EngineConfig
from cai_async.evaluation.run import EvalConfig, run_eval
from cai_async.exitcodes import leaves
from cai_async.exports import RLExportConfig, conversations_with_response, write_rl_exports, write_sl_exports
from cai_async.guard.config import GuardConfig
from cai_async.prompts import load_prompts
from cai_async.public_data import HUB_DIR
from cai_async.scale import Executor, RayConfig, executor_scope
from cai_async.stages.common import StageReport
from cai_async.stages.generate import GenerateConfig, run_generate
from cai_async.stages.label import LabelConfig, Labeller, LabelReport, label_pairs
from cai_async.stages.pairs import PairsConfig, PairsReport, run_pairs
from cai_async.stages.sl import SLConfig, SLReport, run_sl
from cai_async.store import read_shards
from cai_async.train.config import TrainConfig

__all__ = [
    "METHOD_KEYS",
    "RLConfig",
    "Recipe",
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


def lift_method_keys(data: dict[str, Any], *, source: str, replace: bool = False) -> dict[str, Any]:
    """Move the top-level :data:`METHOD_KEYS` to their sections. A key given both ways is an error naming both,
    unless ``replace`` (command-line overrides, which win over the file)."""
    result = dict(data)
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


class RLConfig(BaseModel):
    """RL-CAI (recipe key ``rl``): where pairs come from, how they are labelled, what is exported."""

    model_config = ConfigDict(extra="forbid")

    pairs: PairsConfig = Field(default_factory=PairsConfig)
    label: LabelConfig = Field(default_factory=LabelConfig)
    export: RLExportConfig = Field(default_factory=RLExportConfig)


class Recipe(BaseModel):
    """A run: where it writes, the engine's endpoints and policies, and the stages to run."""

    model_config = ConfigDict(extra="forbid")

    run_dir: str = "runs/default"
    retry_errors: bool = False
    """Rerun every row recorded with an error (by default only endpoint-side ones: invalid answers, no logprobs)."""
    engine: EngineConfig = Field(default_factory=EngineConfig)
    generate: GenerateConfig | None = None
    sl: SLConfig | None = None
    rl: RLConfig | None = None
    train: TrainConfig | None = None
    eval: EvalConfig | None = None
    guard: GuardConfig | None = None
    """The inference-time guard (``cai guard serve``); not a stage ``cai run`` runs."""
    executor: Executor = "local"
    """Where the stages' items run: this process's engine, or ``ray``: Ray Data pipelines over engine actors."""
    ray: RayConfig = Field(default_factory=RayConfig)
    """With ``executor: ray``: the cluster, the actors and how they share limits and the cache."""


def _resolve(base: Path, value: str) -> str:
    if not value or Path(value).is_absolute() or value in builtin_constitutions() or "://" in value:
        return value
    return os.path.normpath(base / value)


def load_recipe(path: str | Path | None, overrides: Iterable[str] = ()) -> Recipe:
    """Defaults → recipe file → ``key=value`` overrides. Relative file paths written in the recipe (inputs,
    constitution) resolve against the recipe's folder; ``run_dir`` stays relative to where the command runs."""
    data = lift_method_keys(read_mapping(path), source=str(path)) if path is not None else {}
    recipe = validate(Recipe, data, source=str(path) if path is not None else "defaults")
    if path is not None:
        base = Path(path).parent
        if recipe.generate is not None:
            recipe.generate.input = _resolve(base, recipe.generate.input)
        if recipe.sl is not None:
            recipe.sl.input = _resolve(base, recipe.sl.input)
            recipe.sl.constitution = _resolve(base, recipe.sl.constitution)
            if recipe.sl.export.helpful is not None:
                recipe.sl.export.helpful.input = _resolve(base, recipe.sl.export.helpful.input)
        if recipe.rl is not None:
            recipe.rl.pairs.input = _resolve(base, recipe.rl.pairs.input)
            if recipe.rl.label.principles not in builtin_comparison_sets():
                recipe.rl.label.principles = _resolve(base, recipe.rl.label.principles)
        if recipe.eval is not None and recipe.eval.data_dir and recipe.eval.data_dir != HUB_DIR:
            recipe.eval.data_dir = _resolve(base, recipe.eval.data_dir)
    if overrides:
        data = apply_overrides(recipe.model_dump(mode="json"), overrides)
        recipe = validate(Recipe, lift_method_keys(data, source=str(path), replace=True), source=str(path))
    return recipe


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    tmp.replace(path)


def _report(report: StageReport) -> dict[str, Any]:
    data = {
        "total": report.total,
        "skipped_already_done": report.skipped,
        "errors_kept": report.errors_kept,
        "written": report.written,
        "failed": report.failed,
        "failures": report.failures[:50],
        "failure_classes": dict(Counter(f.get("class") or "error" for f in report.failures).most_common()),
        "stopped": report.stopped,
        "seconds": round(report.seconds, 3),
    }
    if isinstance(report, SLReport):
        data.update(ok=report.ok, errors=report.errors)
    if isinstance(report, LabelReport):
        data.update(labelled=report.labelled, abstained=report.abstained, errors=report.errors)
    return data


def _pairs_report(report: PairsReport) -> dict[str, Any]:
    data = _report(report)
    return {"prompts": data.pop("total"), "pairs_written": data.pop("written"),
            "identical_dropped": report.identical_dropped, **data}


async def run_rl_stage(
    engine: Engine, config: RLConfig, run_dir: Path, *, retry_errors: bool = False
) -> dict[str, Any]:
    """Pairs into ``rl/pairs/``, AI-feedback labels into ``rl/labels/``, then the dpo and reward exports."""
    labeller = Labeller(engine, config.label, run_dir.name)  # a bad comparison set fails before any call
    pairs_report = await run_pairs(engine, config.pairs, run_dir / "rl" / "pairs", run_dir=run_dir)
    report = _report(await label_pairs(labeller, pairs_report.rows, run_dir / "rl" / "labels",
                                       retry_errors=retry_errors))
    report["pairs"] = _pairs_report(pairs_report)
    report["exports"] = write_rl_exports(run_dir, read_shards(run_dir / "rl" / "labels"), config.export)
    return report


async def run_sl_stage(
    engine: Engine, config: SLConfig, run_dir: Path, *, retry_errors: bool = False
) -> dict[str, Any]:
    """Chains into ``sl/``, helpfulness responses into ``helpful/`` when the mix needs them, then exports."""
    report = _report(await run_sl(engine, config, run_dir / "sl", run_id=run_dir.name, retry_errors=retry_errors))
    helpful = config.export.helpful
    helpful_rows = None
    chains = read_shards(run_dir / "sl")
    if helpful is not None:
        finished = chains.filter(pl.col("status") == "ok").height if not chains.is_empty() else 0
        needed = max(1, math.ceil(helpful.ratio / (1 - helpful.ratio) * finished))
        limit = min(helpful.limit or needed, needed)
        if helpful.response_column is None:
            generated = await run_generate(engine, GenerateConfig(
                input=helpful.input, prompt_column=helpful.prompt_column, id_column=helpful.id_column,
                limit=limit, max_tokens=helpful.max_tokens, seed=config.seed, role=config.policy_role,
            ), run_dir / "helpful")
            report["helpful"] = _report(generated)
            frame = read_shards(run_dir / "helpful")
        else:
            rows = load_prompts(helpful.input, column=helpful.prompt_column, id_column=helpful.id_column,
                                response_column=helpful.response_column)[:limit]
            frame = pl.DataFrame([{"id": r.id, "messages": r.conversation(), "response": r.response} for r in rows])
        helpful_rows = conversations_with_response(frame)
    report["exports"] = write_sl_exports(run_dir, chains, config.export, helpful_rows)
    return report


async def run_eval_stage(engine: Engine, config: EvalConfig, run_dir: Path) -> dict[str, Any]:
    """Suites → ``eval/samples/``, metrics → ``eval/metrics.json``, report → ``eval/report.html`` + PNGs."""
    from cai_async.evaluation.report import write_report

    out = run_dir / "eval"
    metrics = await run_eval(engine, config, out)
    _write_json(out / "metrics.json", metrics)
    metrics["report"] = str(write_report(metrics, read_shards(out / "samples"), out))
    return metrics


async def run_recipe(
    recipe: Recipe,
    *,
    progress: Callable[[Engine, str], AbstractAsyncContextManager[Any]] | None = None,
) -> dict[str, Any]:
    """Run the recipe's stages; write ``config.yaml`` (no secrets: keys are named by variable) and
    ``summary.json`` into the run directory; return the summary."""
    run_dir = Path(recipe.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(
        yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False), encoding="utf-8"
    )
    summary: dict[str, Any] = {"run_dir": str(run_dir), "started": time.time(), "stages": {}}
    from cai_async.plan import plan_recipe

    summary["plan"] = plan_recipe(recipe)["total"]  # the estimate, beside what the engine accounts below
    try:
        if any(stage is not None for stage in (recipe.generate, recipe.sl, recipe.rl)):
            await _run_engine_stages(recipe, run_dir, summary, progress, phase="data")
        if recipe.train is not None:
            from cai_async.train.run import run_training

            for stage in recipe.train.stages:
                summary["stages"][f"train/{stage}"] = await anyio.to_thread.run_sync(
                    functools.partial(run_training, stage, recipe.train, run_dir, engine_config=recipe.engine)
                )
        if recipe.eval is not None:  # after training, so a trained model can be one of the models
            await _run_engine_stages(recipe, run_dir, summary, progress, phase="eval")
    except BaseException as exc:  # group down, refused key: say in summary.json where and why the run stopped
        stopped = next((leaf for leaf in leaves(exc) if isinstance(leaf, RunStopped)), None)
        if stopped is not None:
            summary["stopped"] = {"stage": summary.get("running"), "reason": str(stopped),
                                  "class": type(stopped).__name__}
        raise
    finally:
        summary.pop("running", None)
        summary["finished"] = time.time()
        _write_json(run_dir / "summary.json", summary)
    return summary


def _usage(engine: Engine) -> dict[str, Any]:
    accounting = engine.accounting
    return {"calls": sum(s.calls for s in accounting.endpoints.values()), "cache_hits": accounting.cache_hits,
            "tokens": accounting.tokens, "cost_usd": accounting.cost_usd}


async def _reported(work: Awaitable[StageReport]) -> dict[str, Any]:
    return _report(await work)


async def _stage(summary: dict[str, Any], name: str, engine: Engine, work: Awaitable[dict[str, Any]]) -> None:
    """Run one stage and keep its report, with the calls, tokens and dollars it spent, under ``name``."""
    before = _usage(engine)
    report = await work
    after = _usage(engine)
    report["usage"] = {key: round(after[key] - before[key], 6) for key in after}
    summary["stages"][name] = report


async def _run_engine_stages(
    recipe: Recipe,
    run_dir: Path,
    summary: dict[str, Any],
    progress: Callable[[Engine, str], AbstractAsyncContextManager[Any]] | None,
    *,
    phase: Literal["data", "eval"],
) -> None:
    """Data stages run with every group but those only the evaluation names (a model trained later in the run
    need not exist yet); the evaluation runs with all of them."""
    config = recipe.engine
    if phase == "data" and recipe.eval is not None:
        used = {"policy", "critic"} | ({recipe.generate.role} if recipe.generate else set())
        used |= {recipe.sl.policy_role, recipe.sl.critic_role, recipe.sl.revision_role or ''} if recipe.sl else set()
        used |= {recipe.rl.pairs.policy_role, recipe.rl.label.critic_role} if recipe.rl else set()
        eval_only = {m.group for m in recipe.eval.models} - used
        config = config.model_copy(update={"groups": {k: v for k, v in config.groups.items() if k not in eval_only}})
    async with Engine(config, run_dir=run_dir) as engine, executor_scope(recipe.executor, recipe.ray, config, run_dir):

        async def stage(name: str, work: Awaitable[dict[str, Any]]) -> None:
            summary["running"] = name
            display = progress(engine, name) if progress is not None else nullcontext()
            async with display:  # one progress display per stage
                await _stage(summary, name, engine, work)

        try:
            if phase == "eval":
                assert recipe.eval is not None
                await stage("eval", run_eval_stage(engine, recipe.eval, run_dir))
                return
            if recipe.generate is not None:
                await stage("generate", _reported(run_generate(engine, recipe.generate, run_dir / "generate")))
            if recipe.sl is not None:
                await stage("sl", run_sl_stage(engine, recipe.sl, run_dir, retry_errors=recipe.retry_errors))
            if recipe.rl is not None:
                await stage("rl", run_rl_stage(engine, recipe.rl, run_dir, retry_errors=recipe.retry_errors))
        finally:
            summary["engine" if phase == "data" else "engine_eval"] = engine.summary()
