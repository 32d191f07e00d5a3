"""The names that used to mislead, renamed: the judge group (``judge``, formerly ``critic``, which PPO also calls
its value model) and the labelling stage's recipe key (``label``, formerly ``rl``, which ``train.rl_*`` also
uses for RL training). The old names keep working and say so in one line, once."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

import backends.deprecation as deprecation
from backends.errors import ConfigError
from cai_async.engine import JUDGE, EngineConfig
from cai_async.recipes import Recipe, load_recipe
from cai_async.train.config import RewardServerConfig, TrainConfig

ENDPOINT = {"backend": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1"}


@pytest.fixture(autouse=True)
def fresh_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deprecation, "_said", set())


def renamed_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "backends.deprecation"]


def test_the_judge_group_is_found_by_either_name_and_the_old_one_says_so_once(
        caplog: pytest.LogCaptureFixture) -> None:
    old = EngineConfig.model_validate({"groups": {"policy": [{**ENDPOINT, "name": "p"}],
                                                  "critic": [{**ENDPOINT, "name": "c"}]}})
    new = EngineConfig.model_validate({"groups": {"policy": [{**ENDPOINT, "name": "p"}],
                                                  "judge": [{**ENDPOINT, "name": "j"}]}})
    bare = EngineConfig.model_validate({"groups": {"policy": [{**ENDPOINT, "name": "p"}]}})
    with caplog.at_level(logging.WARNING, logger="backends.deprecation"):
        assert [e.name for e in new.group(JUDGE)] == ["j"]
        assert renamed_lines(caplog) == []  # the new name says nothing
        for _ in range(3):
            assert [e.name for e in old.group(JUDGE)] == ["c"]
        assert renamed_lines(caplog) == [
            "engine.groups: 'critic' is now called 'judge'; the old name still works (rename it to silence this line)"]
        assert [e.name for e in new.group("critic")] == ["j"]  # a recipe's judge_role: critic finds the new group
        assert [e.name for e in bare.group(JUDGE)] == ["p"] == [e.name for e in bare.group("critic")]
    assert len(renamed_lines(caplog)) == 2
    with pytest.raises(ConfigError, match="no endpoint group 'attacker'"):
        bare.group("attacker")


def test_every_role_that_judges_defaults_to_the_judge_group() -> None:
    recipe = Recipe.model_validate({"sl": {"input": "p.jsonl"}, "label": {}, "redteam": {}, "guard": {},
                                    "eval": {"models": [{"name": "m", "group": "policy"}]}})
    assert recipe.sl is not None and recipe.label is not None and recipe.eval is not None and recipe.guard
    assert {recipe.sl.critic_role, recipe.label.label.judge_role, recipe.eval.judge_role,
            recipe.redteam.judge_role, recipe.guard.judge_role, recipe.guard.train.generate_role} == {JUDGE}
    assert TrainConfig().reward_from == JUDGE


def test_reward_from_critic_reads_as_judge(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="backends.deprecation"):
        assert TrainConfig.model_validate({"reward_from": "critic"}).reward_from == JUDGE
        assert RewardServerConfig.model_validate({"reward_from": "critic"}).reward_from == JUDGE
    assert renamed_lines(caplog) == [
        "reward_from: 'critic' is now called 'judge'; the old name still works (rename it to silence this line)"]


def write(folder: Path, data: dict[str, Any]) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_label_key_and_its_old_name_rl(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    section = {"pairs": {"source": "sl"}, "label": {"principles": "harmless", "ensemble": 3}}
    with caplog.at_level(logging.WARNING, logger="backends.deprecation"):
        new = load_recipe(write(tmp_path, {"label": section}))
        assert renamed_lines(caplog) == []
        old = load_recipe(write(tmp_path, {"rl": section}))
    assert new.label == old.label and new.label is not None and new.label.label.ensemble == 3
    assert renamed_lines(caplog) == [
        f"{tmp_path / 'recipe.yaml'}: 'rl' is now called 'label'; the old name still works (rename it to silence "
        "this line)"]
    assert "rl" not in old.model_dump() and old.model_dump()["label"]["label"]["ensemble"] == 3
    with pytest.raises(ConfigError, match="rl and label are both given"):
        load_recipe(write(tmp_path, {"rl": section, "label": section}))
    for key in ("label", "rl"):  # a --set under either name lands in the section
        overridden = load_recipe(write(tmp_path, {"rl": section}), [f"{key}.label.ensemble=1"])
        assert overridden.label is not None and overridden.label.label.ensemble == 1
        assert overridden.label.pairs.source == "sl"
    in_code = Recipe.model_validate({"rl": section})  # the Python API reads the old key too
    assert in_code.label == new.label and in_code.rl is in_code.label


def test_the_labellers_judge_role_and_its_old_name_critic_role(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    section = {"pairs": {"source": "sl"}, "label": {"critic_role": "big"}}
    with caplog.at_level(logging.WARNING, logger="backends.deprecation"):
        old = load_recipe(write(tmp_path, {"label": section}))
        assert old.label is not None and old.label.label.judge_role == "big"
        assert renamed_lines(caplog) == [
            "label.label: 'critic_role' is now called 'judge_role'; the old name still works (rename it to silence "
            "this line)"]
        new = load_recipe(write(tmp_path, {"label": {**section, "label": {"judge_role": "big"}}}))
        assert new.label == old.label and "critic_role" not in new.model_dump()["label"]["label"]
        overridden = load_recipe(write(tmp_path, {"label": {"pairs": {"source": "sl"}}}),
                                 ["label.label.critic_role=other"])  # --set under the old name
        assert overridden.label is not None and overridden.label.label.judge_role == "other"
    assert len(renamed_lines(caplog)) == 1  # once per process
    with pytest.raises(ConfigError) as info:
        load_recipe(write(tmp_path, {"label": {**section, "label": {"critic_role": "a", "judge_role": "b"}}}))
    assert "label.label" in str(info.value) and "critic_role and judge_role are both given" in str(info.value)
