"""Recipes: the run configuration (engine + stages) and the runner that calls stages in order."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractAsyncContextManager, nullcontext
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from cai_async.configio import apply_overrides, load_config, validate
from cai_async.engine import Engine, EngineConfig
from cai_async.stages.generate import GenerateConfig, GenerateReport, run_generate

__all__ = ["Recipe", "load_recipe", "run_recipe"]


class Recipe(BaseModel):
    """A run: where it writes, the engine's endpoints and policies, and the stages to run."""

    model_config = ConfigDict(extra="forbid")

    run_dir: str = "runs/default"
    engine: EngineConfig = Field(default_factory=EngineConfig)
    generate: GenerateConfig | None = None


def load_recipe(path: str | Path | None, overrides: Iterable[str] = ()) -> Recipe:
    """Defaults → recipe file → ``key=value`` overrides. Relative input paths written in the file resolve
    against the file's folder; ``run_dir`` stays relative to where the command runs."""
    recipe = load_config(Recipe, path)
    if path is not None and recipe.generate is not None and recipe.generate.input:
        candidate = Path(recipe.generate.input)
        if not candidate.is_absolute():
            recipe.generate.input = os.path.normpath(Path(path).parent / candidate)
    if overrides:
        recipe = validate(Recipe, apply_overrides(recipe.model_dump(mode="json"), overrides), source=str(path))
    return recipe


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    tmp.replace(path)


async def run_recipe(
    recipe: Recipe,
    *,
    progress: Callable[[Engine], AbstractAsyncContextManager[Any]] | None = None,
) -> dict[str, Any]:
    """Run the recipe's stages; write ``config.yaml`` (no secrets: keys are named by variable) and
    ``summary.json`` into the run directory; return the summary."""
    run_dir = Path(recipe.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(
        yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False), encoding="utf-8"
    )
    summary: dict[str, Any] = {"run_dir": str(run_dir), "started": time.time(), "stages": {}}
    async with Engine(recipe.engine, run_dir=run_dir) as engine:
        display = progress(engine) if progress is not None else nullcontext()
        try:
            async with display:
                if recipe.generate is not None:
                    report: GenerateReport = await run_generate(engine, recipe.generate, run_dir / "generate")
                    summary["stages"]["generate"] = {
                        "total": report.total,
                        "skipped_already_done": report.skipped,
                        "written": report.written,
                        "failed": report.failed,
                        "failures": report.failures[:50],
                        "stopped": report.stopped,
                        "seconds": round(report.seconds, 3),
                    }
        finally:
            summary["engine"] = engine.summary()
            summary["finished"] = time.time()
            _write_json(run_dir / "summary.json", summary)
    return summary
