"""Stages are units: a toy stage written in this one file (config, run through the engine, plan, command) and
registered from outside the package is picked up by the recipe runner (``summary.json``), by ``cai plan``, and by
the CLI (its command, with the shared endpoint/engine flags); registered in process with ``register_stage``, and
in a ``cai`` subprocess through the ``cai_async.stages`` entry-point group."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import polars as pl
import pytest
from pydantic import ConfigDict

from backends.errors import ConfigError
from backends.types import ChatRequest
from cai_async import read_shards
from cai_async.configio import validate
from cai_async.plan import plan_recipe
from cai_async.prompts import PromptRow, PromptSource
from cai_async.recipes import Recipe, load_recipe, run_recipe
from cai_async.stages.common import StageReport, write_rows
from cai_async.stages.unit import (
    Count,
    StageCommand,
    StageContext,
    StageFlag,
    StagePlan,
    StageUnit,
    load_prompt_texts,
    register_stage,
    stage_unit,
    stage_units,
    unregister_stage,
)
from cai_async.store import ShardWriter
from tests.conftest import ROOT, TestServer, module_imports

CAI = [sys.executable, "-c", "from cai_async.cli import main; main()"]


class ToyConfig(PromptSource):
    """The toy stage: answer each prompt, keep the answer's length (and, with ``upper``, the answer shouted)."""

    model_config = ConfigDict(extra="forbid")

    upper: bool = False
    max_tokens: int = 16
    role: str = "policy"


class ToyStage(StageUnit[ToyConfig]):
    """Writes ``toy/``: one row a prompt with its answer's length."""

    name = "toy"
    config_type = ToyConfig
    after = "sl"
    command = StageCommand(
        name="toy",
        help="Toy: answer prompts and keep their lengths.",
        flags=(StageFlag(name="input", key="toy.input"),
               StageFlag(name="upper", key="toy.upper", type=bool, decls=("--upper/--no-upper",),
                         help="Shout the answers.")),
    )

    def roles(self, config: ToyConfig) -> set[str]:
        return {config.role}

    async def run(self, context: StageContext, config: ToyConfig, entry: str) -> StageReport:
        engine = context.require_engine()
        prompts = config.load()
        report = StageReport(total=len(prompts))

        async def row(prompt: PromptRow) -> dict[str, Any]:
            result = await engine.chat(config.role, ChatRequest(prompt.conversation(), max_tokens=config.max_tokens))
            text = result.text.upper() if config.upper else result.text
            return {"id": prompt.id, "answer": text, "length": len(text)}

        await write_rows(engine, prompts, row, ShardWriter(context.run_dir / "toy"), report,
                         executor=context.executor)
        return report

    def plan(self, recipe: Any, count: Count) -> list[StagePlan]:
        plan = StagePlan("toy", recipe.toy.role)
        for text in load_prompt_texts(recipe.toy):
            plan.add(1, count(text), recipe.toy.max_tokens)
        return [plan]

    def missing(self, config: ToyConfig | None, source: str) -> str | None:
        return None if config is not None and config.input else "no prompts: pass --input FILE"


STAGE = ToyStage()


@pytest.fixture
def toy() -> Iterator[ToyStage]:
    register_stage(STAGE)
    yield STAGE
    unregister_stage("toy")


def _prompts(tmp_path: Path, n: int = 3) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"toy prompt {i}"}) + "\n" for i in range(n)))
    return path


def _recipe(tmp_path: Path, server: TestServer, **toy: Any) -> dict[str, Any]:
    return {"run_dir": str(tmp_path / "run"), "engine": {"progress": "off", "groups": {"policy": [
        {"backend": "openai", "model": "m", "base_url": server.base_url}]}},
        "toy": {"input": str(_prompts(tmp_path)), **toy}}


def test_the_registry_orders_stages_and_registration_is_undone(toy: ToyStage) -> None:
    assert [u.name for u in stage_units()] == ["redteam", "generate", "sl", "toy", "label", "train", "eval"]
    with pytest.raises(ConfigError, match="'toy' is already registered"):
        register_stage(STAGE)
    unregister_stage("toy")
    assert "toy" not in [u.name for u in stage_units()]
    with pytest.raises(ConfigError, match="toy: unknown key"):
        validate(Recipe, {"toy": {"input": "p.jsonl"}})
    register_stage(STAGE)  # for the fixture's teardown


def test_run_and_plan_pick_up_a_registered_stage(tmp_path: Path, server: TestServer, toy: ToyStage) -> None:
    recipe = validate(Recipe, _recipe(tmp_path, server, upper=True))
    assert isinstance(recipe.toy, ToyConfig) and recipe.toy.upper  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=r"toy\.uper: unknown key"):
        validate(Recipe, {"toy": {"input": "p.jsonl", "uper": True}})

    estimate = plan_recipe(recipe)
    (row,) = [r for r in estimate["stages"] if r["stage"] == "toy"]
    assert row["calls"] == 3 and row["output_tokens"] == 3 * 16 and estimate["total"]["calls"] == 3

    summary = anyio.run(run_recipe, recipe)
    report = summary["stages"]["toy"]
    assert report["written"] == 3 and report["failed"] == 0 and report["usage"]["calls"] == 3
    assert summary["plan"]["calls"] == 3 and "engine" in summary
    frame = read_shards(tmp_path / "run" / "toy")
    assert frame.height == 3
    assert frame["answer"].str.starts_with("REPLY ").all()
    assert frame["length"].to_list() == frame["answer"].str.len_chars().to_list()
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["stages"]["toy"]["written"] == 3
    again = load_recipe(tmp_path / "run" / "config.yaml")  # the resolved recipe reads back with its toy section
    assert again.toy == recipe.toy  # type: ignore[attr-defined]


def _entry_point_env(tmp_path: Path) -> dict[str, str]:
    """A distribution on PYTHONPATH that names the toy unit in the ``cai_async.stages`` entry-point group."""
    site = tmp_path / "site"
    info = site / "toy_stage-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-stage\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[cai_async.stages]\ntoy = tests.test_stage_units:STAGE\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return env


def test_the_cli_picks_up_a_stage_from_an_entry_point(tmp_path: Path, server: TestServer) -> None:
    env = _entry_point_env(tmp_path)

    def cai(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CAI, *args], capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)

    listed = cai("--help")
    assert listed.returncode == 0 and "Toy: answer prompts" in listed.stdout, listed.stderr
    helped = cai("toy", "--help")
    assert helped.returncode == 0, helped.stderr
    for flag in ("--input", "--upper", "--no-upper", "--run-dir", "--backend", "--base-url", "--api-key-env",
                 "--rpm", "--max-concurrency", "--max-cost", "--batch", "--no-cache", "--progress", "--set"):
        assert flag in helped.stdout, flag
    missing = cai("toy", "--base-url", server.base_url, "--model", "m")
    assert missing.returncode == 2 and "no prompts: pass --input FILE" in missing.stderr

    run_dir = tmp_path / "run"
    out = cai("toy", "--input", str(_prompts(tmp_path)), "--no-upper", "--base-url", server.base_url, "--model", "m",
              "--run-dir", str(run_dir), "--progress", "off", "--set", "toy.max_tokens=8")
    assert out.returncode == 0, out.stderr
    assert "toy: 3 written, 0 already done" in out.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert list(summary["stages"]) == ["toy"] and summary["stages"]["toy"]["written"] == 3
    assert pl.read_parquet(next((run_dir / "toy").glob("*.parquet")))["answer"].str.starts_with("Reply ").all()

    planned = cai("plan", str(run_dir / "config.yaml"))
    assert planned.returncode == 0, planned.stderr
    (line,) = [line for line in planned.stdout.splitlines() if line.startswith("toy ")]
    assert line.split()[1:3] == ["policy", "3"]  # group, calls


def test_the_stage_list_is_written_once() -> None:
    """The guard reaches the critique → revision step without the stages, and the stages import none of the rooms
    that use them; the runner, the planner and the CLI name no stage's work (they loop over the registry)."""
    arrows = {"guard": ("cai_async.stages",), "revision.py": ("cai_async.stages", "cai_async.guard"),
              "stages": ("cai_async.evaluation", "cai_async.recipes", "cai_async.cli", "cai_async.guard",
                         "cai_async.plan")}
    for place, forbidden in arrows.items():
        target = ROOT / "cai_async" / place
        for file in sorted(target.glob("*.py")) if target.is_dir() else [target]:
            assert not {m for m in module_imports(file) if m.startswith(forbidden)}, file
    for name in ("recipes.py", "plan.py", "cli/app.py", "cli/stages.py", "cli/flags.py"):
        text = (ROOT / "cai_async" / name).read_text(encoding="utf-8")
        for call in ("run_generate(", "run_sl(", "run_pairs(", "label_pairs(", "run_eval(", "_plan_"):
            assert call not in text, f"{name} calls {call}"


def test_one_stage_command_leaves_out_the_model_a_later_stage_trains() -> None:
    """``cai sl recipes/quickstart.yaml`` before any training: the eval's ``after`` group (the model the train
    stage writes) is not in the engine, so its missing folder is not loaded; the groups SL calls stay."""
    from cai_async.cli.stages import only_stage

    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml")
    before = set(recipe.engine.groups)
    assert "after" in before
    sl = stage_unit("sl")
    assert sl is not None
    only_stage(recipe, sl, "quickstart.yaml")
    assert recipe.eval is None and recipe.train is None and recipe.label is None
    assert "after" not in recipe.engine.groups
    assert "policy" in recipe.engine.groups  # what SL calls (its critic falls back to the policy group)
