"""The public data bundled with the package: every data set with its upstream LICENSE and a NOTICE, defaults
that read it, the full sets by name from the Hugging Face Hub (``datasets`` loading a local folder: only the
unreachable network edge is replaced), and missing data as one line naming the suite and how to get it."""

from __future__ import annotations

import gzip
import json
import re
import shutil
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from cai_async import ConfigError
from cai_async.evaluation import load_suite
from cai_async.labelquality import human_pairs
from cai_async.public_data import BUNDLED, HH_PAIRS, HH_TURNS, HUB, SOURCES, WHOLE, HubSet, first_human_turns
from tests.conftest import PUBLIC_DATA, TestServer
from tests.test_cli import cai

FOLDERS = ["hh_rlhf", "advbench", "xstest", "gptfuzz", "fastchat_llm_judge", "llm_swarm", "self_instruct"]


def test_bundled_data_is_inside_the_repository_with_licenses_and_notices() -> None:
    assert BUNDLED == PUBLIC_DATA.resolve()
    assert "Content warning" in (BUNDLED / "README.md").read_text(encoding="utf-8")
    assert sorted(p.name for p in BUNDLED.iterdir() if p.is_dir()) == sorted(FOLDERS)
    for folder in FOLDERS:
        license_text = (BUNDLED / folder / "LICENSE").read_text(encoding="utf-8")
        assert "MIT License" in license_text or "Apache License" in license_text or "Attribution 4.0" in license_text
        notice = (BUNDLED / folder / "NOTICE.md").read_text(encoding="utf-8")
        assert "github.com/" in notice and re.search(r"`[0-9a-f]{40}`", notice), folder
    xstest = (BUNDLED / "xstest" / "NOTICE.md").read_text(encoding="utf-8")
    assert "Röttger" in xstest and "NAACL 2024" in xstest and "Attribution 4.0" in xstest
    for relpath in SOURCES:  # every file a data folder has is bundled, and ``hub`` can serve each
        assert (BUNDLED / relpath).is_file(), relpath
        assert (relpath in HUB) != (relpath in WHOLE), relpath


def test_the_hub_rule_for_first_turns_remakes_the_bundled_prompts() -> None:
    with gzip.open(BUNDLED / HH_PAIRS, "rt", encoding="utf-8") as handle:
        chosen = [json.loads(line)["chosen"] for line in handle]
    derived = first_human_turns(chosen)
    bundled = pl.read_ndjson(BUNDLED / HH_TURNS).filter(pl.col("row_index") < len(chosen))
    assert len(derived) == bundled.height > 200
    assert [(d["id"], d["prompt"], d["row_index"]) for d in derived] == list(
        zip(bundled["id"], bundled["prompt"], bundled["row_index"], strict=True))


def test_label_quality_pairs_slice_is_large_enough_for_the_default_limit() -> None:
    assert len(human_pairs(BUNDLED / HH_PAIRS, limit=200)) == 200


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any, Any]]:
    """``datasets.load_dataset`` of a Hub id reads a local folder laid out like that Hub repository (the real
    loader, file discovery and split inference run; only the network is not reached)."""
    datasets = pytest.importorskip("datasets")
    real = datasets.load_dataset
    repos = tmp_path / "hub"
    hh = repos / "Anthropic" / "hh-rlhf" / "harmless-base"
    hh.mkdir(parents=True)
    shutil.copy(BUNDLED / HH_PAIRS, hh / "test.jsonl.gz")
    advbench = repos / "walledai" / "AdvBench" / "data"
    advbench.mkdir(parents=True)
    pl.read_csv(BUNDLED / "advbench" / "harmful_behaviors.csv").rename({"goal": "prompt"}).write_parquet(
        advbench / "train-00000-of-00001.parquet")
    calls: list[tuple[str, Any, Any]] = []

    def load_dataset(path: str, *, data_dir: str | None = None, split: str | None = None) -> Any:
        calls.append((path, data_dir, split))
        if not (repos / path).is_dir():
            raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)")
        return real(str(repos / path), data_dir=data_dir, split=split, cache_dir=str(tmp_path / "cache"))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_loads_the_full_sets_by_name(hub: list[tuple[str, Any, Any]]) -> None:
    prompts = load_suite("harmlessness", "hub")
    assert hub == [("Anthropic/hh-rlhf", "harmless-base", "test"), ("walledai/AdvBench", None, None)]
    with gzip.open(BUNDLED / HH_PAIRS, "rt", encoding="utf-8") as handle:
        turns = {t["prompt"] for t in first_human_turns([json.loads(line)["chosen"] for line in handle])}
    assert {p.prompt for p in prompts if p.source == "hh-rlhf"} == turns
    goals = pl.read_csv(BUNDLED / "advbench" / "harmful_behaviors.csv")["goal"].to_list()
    assert [p.prompt for p in prompts if p.source == "advbench"] == goals
    assert load_suite("overrefusal", "hub") == load_suite("overrefusal")  # bundled whole: no Hub call
    assert len(hub) == 2


def test_hub_unreachable_is_one_line(hub: list[tuple[str, Any, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(HUB, HH_TURNS, HubSet("nobody/unreachable", split="test"))
    with pytest.raises(ConfigError) as info:
        load_suite("harmlessness", "hub")
    message = str(info.value)
    assert "\n" not in message and message.startswith("eval suite 'harmlessness': could not load nobody/unreachable")
    assert "ConnectionError" in message and "eval.data_dir" in message


def test_missing_suite_data_is_one_line_naming_the_suite(tmp_path: Path, server: TestServer) -> None:
    with pytest.raises(ConfigError, match=r"eval suite 'jailbreak': .*GPTFuzzer.csv not found; put github.com/"
                                          r"sherdencooper/GPTFuzz datasets/prompts/GPTFuzzer.csv there"):
        load_suite("jailbreak", tmp_path)
    recipe = tmp_path / "eval.yaml"
    group = f"[{{backend: openai, model: m, base_url: '{server.base_url}'}}]"
    recipe.write_text(f"run_dir: {tmp_path / 'run'}\nengine:\n  groups:\n    m: {group}\n    judge: {group}\n"
                      f"  progress: off\neval:\n  models: [{{name: m, group: m}}]\n  suites: [overrefusal]\n"
                      f"  data_dir: empty\n")
    (tmp_path / "empty").mkdir()
    out = cai("eval", str(recipe), "--n", "2")
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert "eval suite 'overrefusal'" in line and f"{tmp_path / 'empty' / 'xstest' / 'xstest_prompts.csv'}" in line
    assert "eval.data_dir: hub" in line and "Traceback" not in out.stderr
    assert server.stats().get("requests", 0) == 0  # nothing was asked of a model


def test_redteam_data_folder_with_wrong_columns_is_one_line_naming_its_key(tmp_path: Path) -> None:
    """A red-team data folder whose files miss the columns read (or the files) is one ConfigError that names the
    columns and ``redteam.data_dir``, not a polars error from deep inside the seed draw."""
    from cai_async.redteam.config import RedteamConfig
    from cai_async.redteam.seeds import load_seeds
    from cai_async.redteam.transforms import jailbreak_templates

    (tmp_path / "advbench").mkdir()
    (tmp_path / "advbench" / "harmful_behaviors.csv").write_text("behaviour,target\nx,y\n")
    with pytest.raises(ConfigError) as info:
        load_seeds(RedteamConfig(data_dir=str(tmp_path)))
    message = str(info.value)
    assert "\n" not in message and message.startswith("redteam seeds: advbench/harmful_behaviors.csv needs the "
                                                      "columns goal; missing goal")
    (tmp_path / "gptfuzz").mkdir()
    (tmp_path / "gptfuzz" / "GPTFuzzer.csv").write_text("id,template\n1,x\n")
    with pytest.raises(ConfigError, match=re.escape("redteam strategy 'template': gptfuzz/GPTFuzzer.csv needs the "
                                                    "columns text; missing text")):
        jailbreak_templates(str(tmp_path))
    with pytest.raises(ConfigError) as info:
        load_seeds(RedteamConfig(data_dir=str(tmp_path), seeds=["hh_rlhf"]))
    message = str(info.value)
    assert "not found" in message and "set redteam.data_dir: hub" in message and "eval.data_dir" not in message
    (tmp_path / "advbench" / "harmful_behaviors.csv").write_bytes(b'\x00\xff garbage\n"unterminated,\n')
    (tmp_path / "hh_rlhf").mkdir()
    (tmp_path / HH_TURNS).write_text('{"prompt": "a"}\n{not json\n')
    for seeds, kind in ((["advbench"], "CSV"), (["hh_rlhf"], "JSON lines")):  # unreadable files: one line each
        with pytest.raises(ConfigError) as info:
            load_seeds(RedteamConfig(data_dir=str(tmp_path), seeds=seeds))
        message = str(info.value)
        assert "\n" not in message and f"is not readable as {kind} (" in message and "redteam.data_dir" in message
    (tmp_path / "advbench" / "harmful_behaviors.csv").write_text("goal,target\n1,x\n,y\n")
    with pytest.raises(ConfigError, match=re.escape("advbench/harmful_behaviors.csv has empty values in goal (row 1)")):
        load_seeds(RedteamConfig(data_dir=str(tmp_path), seeds=["advbench"]))
    (tmp_path / "advbench" / "harmful_behaviors.csv").write_text("goal,target\n1,x\n2,y\n")
    numbers = load_seeds(RedteamConfig(data_dir=str(tmp_path), seeds=["advbench"]))  # read as the texts they are
    assert sorted(s.behaviour for s in numbers) == ["1", "2"]
