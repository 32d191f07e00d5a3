"""A recipe is checked end to end before any call: each stage entry's inputs are written by an earlier entry of
the recipe or exist already; otherwise one line names the entry, the input and the fix, the exit code is 2, and
the endpoint receives nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml

from backends.errors import ConfigError
from cai_async.recipes import Recipe, check_inputs, run_recipe
from tests.conftest import ROOT, TestServer
from tests.test_cli import cai

PROMPTS = ROOT / "cai_async" / "data" / "quickstart_prompts.jsonl"


def recipe_data(server: TestServer, run_dir: Path, **sections: Any) -> dict[str, Any]:
    endpoint = {"name": "srv", "backend": "openai", "model": "m", "base_url": server.base_url}
    return {"run_dir": str(run_dir), "engine": {"groups": {"policy": [endpoint]}, "progress": "off"}, **sections}


def run_cli(tmp_path: Path, data: dict[str, Any]) -> Any:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return cai("run", str(path))


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def test_a_stage_whose_input_nothing_writes_stops_the_run_before_any_call(tmp_path: Path, server: TestServer) -> None:
    # DPO training reads exports/dpo.parquet, which only a label section writes; this recipe has sl only
    data = recipe_data(server, tmp_path / "run", sl={"input": str(PROMPTS), "limit": 2},
                       train={"stages": ["dpo"], "model": "embedded", "device": "cpu"})
    out = run_cli(tmp_path, data)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    [line] = error_lines(out.stderr)
    assert line.startswith("error: train/dpo: the dpo export not found: ")
    assert f"{tmp_path / 'run' / 'exports' / 'dpo.parquet'} (and no earlier stage of this recipe writes it)" in line
    assert "add a label section to the recipe" in line and "train.dpo_data" in line
    assert server.stats().get("requests", 0) == 0  # SL did not run
    assert not (tmp_path / "run" / "sl").exists() and not (tmp_path / "run" / "summary.json").exists()


def test_ppo_whose_inputs_cannot_exist_fails_before_sl_and_sft(tmp_path: Path, server: TestServer) -> None:
    # the case: sl → SFT → PPO, where PPO's prompts (the dpo export) come from no stage, the model is a GGUF
    # OpenRLHF cannot load, and (on this machine) OpenRLHF is not installed
    data = recipe_data(server, tmp_path / "run", sl={"input": str(PROMPTS), "limit": 2},
                       train={"stages": ["sft", "rl"], "model": "embedded", "rl_algorithm": "ppo", "device": "cpu"})
    out = run_cli(tmp_path, data)
    assert out.returncode == 2, out.stderr
    [line] = error_lines(out.stderr)
    assert line.startswith("error: train/rl: the dpo export (PPO's prompts) not found: ")
    assert "set train.rl_prompts or train.ppo.prompts" in line
    assert "train/rl: a Hugging Face model folder for OpenRLHF (train.model 'embedded' is a GGUF model) is " \
           "missing" in line
    assert server.stats().get("requests", 0) == 0
    assert not (tmp_path / "run" / "train").exists()


def test_inputs_written_by_earlier_stages_pass(tmp_path: Path, server: TestServer) -> None:
    # sl writes sl/ and exports/sft.parquet; rl (pairs from this run's chains) writes exports/dpo and reward;
    # training reads them in order
    data = recipe_data(server, tmp_path / "run", sl={"input": str(PROMPTS)}, label={"pairs": {"source": "sl"}},
                       train={"stages": ["sft", "reward", "dpo"], "model": "embedded"})
    check_inputs(Recipe.model_validate(data))
    # the label section without its dpo export: the DPO stage has nothing to read
    data["label"]["export"] = {"dpo": False}
    with pytest.raises(ConfigError, match=r"^train/dpo: the dpo export not found"):
        check_inputs(Recipe.model_validate(data))


def test_the_order_of_training_stages_counts(tmp_path: Path, server: TestServer) -> None:
    sections = {"sl": {"input": str(PROMPTS)}, "label": {"pairs": {"source": "sl"}}}
    base = {"model": "embedded", "rl_algorithm": "grpo", "reward_from": "reward_model"}
    fine = recipe_data(server, tmp_path / "run", **sections, train={**base, "stages": ["reward", "rl"], "merge": True})
    check_inputs(Recipe.model_validate(fine))
    late = recipe_data(server, tmp_path / "run", **sections, train={**base, "stages": ["rl", "reward"], "merge": True})
    with pytest.raises(ConfigError, match=r"^train/rl: trained reward model not found: .*list reward before rl"):
        check_inputs(Recipe.model_validate(late))
    adapter = recipe_data(server, tmp_path / "run", **sections, train={**base, "stages": ["reward", "rl"]})
    with pytest.raises(ConfigError, match=r"saves only a LoRA adapter: set train\.merge: true"):
        check_inputs(Recipe.model_validate(adapter))


def test_pairs_from_sl_chains_that_no_stage_makes(tmp_path: Path, server: TestServer) -> None:
    recipe = Recipe.model_validate(recipe_data(server, tmp_path / "run", label={"pairs": {"source": "sl"}}))
    with pytest.raises(ConfigError) as caught:
        anyio.run(run_recipe, recipe)
    message = str(caught.value)
    assert message.startswith(f"label: SL-CAI chains not found: {tmp_path / 'run' / 'sl'} ")
    assert "add an sl section to the recipe" in message and "label.pairs.sl_run" in message
    assert server.stats().get("requests", 0) == 0
    # chains of an earlier run on disk are an input that exists
    (tmp_path / "run" / "sl").mkdir(parents=True)
    (tmp_path / "run" / "sl" / "part-00000.parquet").write_bytes(b"")
    check_inputs(recipe)


def test_missing_files_named_in_the_recipe(tmp_path: Path, server: TestServer) -> None:
    data = recipe_data(server, tmp_path / "run", sl={"input": str(tmp_path / "nowhere.jsonl")})
    with pytest.raises(ConfigError, match=r"^sl: prompt file not found: .*nowhere\.jsonl .*set sl\.input"):
        check_inputs(Recipe.model_validate(data))
    data = recipe_data(server, tmp_path / "run", label={"pairs": {"input": str(PROMPTS)},
                                                     "label": {"principles": str(tmp_path / "mine.yaml")}})
    with pytest.raises(ConfigError, match=r"^label: comparison set not found: .*mine\.yaml .*built-in set \(harmless"):
        check_inputs(Recipe.model_validate(data))
    data = recipe_data(server, tmp_path / "run", label={})
    with pytest.raises(ConfigError, match=r"^label: no prompt file is set \(label\.pairs\.input\); pass --input FILE"):
        check_inputs(Recipe.model_validate(data))
    data = recipe_data(server, tmp_path / "run", sl={"input": str(PROMPTS)},
                       train={"model": str(tmp_path / "no-model")})
    with pytest.raises(ConfigError, match=r"^train/sft: train\.model not found: .*no-model"):
        check_inputs(Recipe.model_validate(data))
