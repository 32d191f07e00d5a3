"""One strict base model, one way to hold a key, one atomic writer: every config model rejects an unknown key through
``StrictModel``; an API key held in pydantic's ``SecretStr`` never shows in a repr, a log line or a config dump;
JSON state files carry ``format_version`` (one from before versions reads, one from a newer build is one clear
line), and a write cut short leaves the old file whole."""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path

import pytest
from pydantic import BaseModel, SecretStr, ValidationError

import cai_async
from backends import BackendSettings, StrictModel
from backends.atomic import JSON_FORMAT_KEY, JSON_FORMAT_VERSION, atomic_path, read_json, write_atomic, write_json
from backends.errors import ConfigError
from backends.options import BackendOptions
from cai_async.configio import validate
from cai_async.engine.config import EndpointConfig, EngineConfig
from cai_async.gap_report import read_gaps
from cai_async.runinfo import describe_run
from cai_async.store import write_json as store_write_json
from tests.test_cli import cai

# The config models that once each said ``model_config = ConfigDict(extra="forbid")`` themselves.
STRICT_MODELS = [
    "cai_async.exports:HelpfulMixConfig", "cai_async.exports:RLExportConfig", "cai_async.exports:ExportConfig",
    "cai_async.gates:GateConfig", "cai_async.prompts:PromptSource", "cai_async.judging:CotConfig",
    "cai_async.evaluation.run:EvalModel", "cai_async.evaluation.run:EvalConfig", "cai_async.stages.rl:RLConfig",
    "cai_async.stages.sl:EarlyStopConfig", "cai_async.stages.label:LabelConfig",
    "cai_async.engine.config:EndpointConfig", "cai_async.engine.config:RetryConfig",
    "cai_async.engine.config:BreakerConfig", "cai_async.engine.config:CacheConfig",
    "cai_async.engine.config:EngineConfig", "cai_async.scale.config:RayConfig",
    "cai_async.train.config:RewardServerConfig", "cai_async.train.config:PPOSettings",
    "cai_async.train.config:LoraSettings", "cai_async.train.config:TrainConfig", "cai_async.loop.config:LoopConfig",
    "cai_async.guard.config:DirectionPolicy", "cai_async.guard.config:StreamPolicy",
    "cai_async.guard.config:SizePolicy", "cai_async.guard.config:UpstreamConfig",
    "cai_async.guard.config:ClassifierTier", "cai_async.guard.config:ExternalGuard",
    "cai_async.guard.config:GuardTrainConfig", "cai_async.guard.config:GuardConfig",
    "cai_async.constitution:GuardRules", "cai_async.constitution:ContrastExample", "cai_async.constitution:Principle",
    "cai_async.constitution:FewShotExample", "cai_async.constitution:Constitution",
    "cai_async.constitution:ComparisonPrinciple", "cai_async.constitution:ComparisonSet",
    "backends.options:OpenAIOptions", "backends.options:BatchOptions", "backends.options:LlamaCppOptions",
    "backends.options:TransformersOptions",
]
FROZEN = {"GuardRules", "ContrastExample", "Principle", "FewShotExample", "Constitution", "ComparisonPrinciple",
          "ComparisonSet"}


def _model(path: str) -> type[BaseModel]:
    module, _, name = path.partition(":")
    model: type[BaseModel] = getattr(importlib.import_module(module), name)
    return model


@pytest.mark.parametrize("path", STRICT_MODELS)
def test_every_config_model_is_strict_through_the_one_base(path: str) -> None:
    model = _model(path)
    assert issubclass(model, StrictModel) and model.model_config["extra"] == "forbid"
    assert model.model_config.get("frozen", False) is (model.__name__ in FROZEN)  # a subclass's keys merge in
    with pytest.raises(ValidationError) as caught:
        model.model_validate({"no_such_key_here": 1})
    assert "no_such_key_here" in {str(e["loc"][-1]) for e in caught.value.errors() if e["type"] == "extra_forbidden"}


def test_the_base_is_exported_and_its_unknown_keys_read_as_before() -> None:
    assert cai_async.StrictModel is StrictModel and issubclass(BackendOptions, StrictModel)

    class Mine(StrictModel):  # a model of one's own (a strategy's config) gets the same check
        size: int = 1

    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        Mine.model_validate({"sise": 2})
    with pytest.raises(ConfigError) as caught:
        validate(EngineConfig, {"groups": {"policy": [{"model": "m", "max_concurency": 2}]}, "retyr": {}})
    assert str(caught.value) == ("config: invalid configuration\n"
                                 "  groups.policy.0.max_concurency: unknown key (check the spelling)\n"
                                 "  retyr: unknown key (check the spelling)")
    with pytest.raises(ConfigError, match=r"  groups\.policy\.0\.api_key: unknown key api_key — use api_key_env"):
        validate(EngineConfig, {"groups": {"policy": [{"model": "m", "api_key": "sk-1"}]}})


def test_a_key_in_a_secret_str_is_never_printed(monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    secret = "sk-live-NEVER-PRINT-424242"
    monkeypatch.setenv("CAI_TEST_KEY", secret)
    settings = EndpointConfig(name="e", model="m", api_key_env="CAI_TEST_KEY").settings()
    assert isinstance(settings.api_key, SecretStr) and settings.api_key.get_secret_value() == secret
    with caplog.at_level(logging.INFO):
        logging.getLogger("cai_async.test").info("settings %s %r", settings, settings.api_key)
    shown = [repr(settings), str(settings), f"{settings.api_key}", str(settings.api_key), repr(settings.api_key),
             caplog.text, json.dumps({"key": settings.api_key}, default=str)]
    assert all(secret not in text for text in shown)
    assert "**********" in repr(settings)
    assert not BackendSettings(endpoint="e").api_key  # no key: empty and false, as before


def test_json_state_carries_its_format_version_first(tmp_path: Path) -> None:
    path = store_write_json(tmp_path / "deep" / "summary.json", {"stages": {}, "run_dir": "r"})
    text = path.read_text(encoding="utf-8")
    assert list(json.loads(text)) == [JSON_FORMAT_KEY, "stages", "run_dir"]
    assert json.loads(text)[JSON_FORMAT_KEY] == JSON_FORMAT_VERSION
    assert read_json(path) == {"stages": {}, "run_dir": "r"}  # read back without it
    assert not list(path.parent.glob(".*.tmp"))
    write_json(tmp_path / "list.json", [1, 2])  # not an object: written as it is
    assert json.loads((tmp_path / "list.json").read_text()) == [1, 2]
    write_json(tmp_path / "theirs.json", {"a": 1}, versioned=False)  # a layout someone else fixes
    assert json.loads((tmp_path / "theirs.json").read_text()) == {"a": 1}


def test_json_state_from_before_versions_is_read_as_it_is(tmp_path: Path) -> None:
    old = {"successes": 1, "uncovered": [], "strategies": {}, "variants": {}}
    (tmp_path / "redteam").mkdir()
    (tmp_path / "redteam" / "gaps.json").write_text(json.dumps(old), encoding="utf-8")
    assert read_gaps(tmp_path) == old
    (tmp_path / "summary.json").write_text(json.dumps({"stages": {"sl": {"failed": 2}}}), encoding="utf-8")
    assert describe_run(tmp_path)["unrecorded_failures"] == {"sl": 2}


@pytest.mark.parametrize("version", [JSON_FORMAT_VERSION + 1, "2.0-beta"])
def test_json_state_of_a_newer_build_is_one_clear_line(tmp_path: Path, version: object) -> None:
    path = tmp_path / "redteam" / "gaps.json"
    path.parent.mkdir()
    path.write_text(json.dumps({JSON_FORMAT_KEY: version, "uncovered": []}), encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        read_gaps(tmp_path)
    message = str(caught.value)
    assert message.startswith(f"{path}: JSON state format_version {version} is newer than this build of cai-async")
    assert f"up to {JSON_FORMAT_VERSION}" in message and "upgrade cai-async" in message and "\n" not in message


def test_the_cli_says_a_newer_summary_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text(json.dumps({JSON_FORMAT_KEY: 99, "stages": {}}), encoding="utf-8")
    out = cai("show", str(tmp_path))
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "summary.json" in lines[0] and "upgrade cai-async" in lines[0], out.stderr


def test_a_write_cut_short_leaves_the_old_file_whole(tmp_path: Path) -> None:
    path = write_atomic(tmp_path / "state.json", '{"old": true}')
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text('{"new": tr', encoding="utf-8")
        raise RuntimeError("killed half-way")
    assert path.read_text(encoding="utf-8") == '{"old": true}' and sorted(p.name for p in tmp_path.iterdir()) == [
        "state.json"]
    write_atomic(path, b'{"new": true}')
    assert json.loads(path.read_text()) == {"new": True} and len(list(tmp_path.iterdir())) == 1
