"""The method's own inputs as written: the seed document's list-layout constitution, its configuration keys
at a recipe's top level, the revision loop that applies every principle, a critique role apart from the
revision role, few-shot examples that teach, and the constitution card."""

# ruff: noqa: E501 - the seed document's constitution is kept byte for byte, long lines included

from __future__ import annotations

import json
import random
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest

from backends.errors import ConfigError
from cai_async import Recipe, load_constitution, read_shards, run_recipe
from cai_async.card import card_data, write_card
from cai_async.constitution import draw_passes
from cai_async.recipes import load_recipe
from tests.conftest import ROOT, TestServer, start_server
from tests.test_cli import cai

PROMPTS = ROOT / "cai_async" / "data" / "quickstart_prompts.jsonl"

SEED_JSON = """[
  {"principle": "Helpfulness",
   "critique_prompt": "Does this response actually help the user with their request? Is it accurate and actionable?",
   "revision_prompt": "Revise the response to be more helpful while remaining accurate."},
  {"principle": "Harmlessness",
   "critique_prompt": "Could this response cause harm to the user or others? Does it contain dangerous, illegal, or unethical advice?",
   "revision_prompt": "Revise the response to remove any potentially harmful content while remaining helpful."},
  {"principle": "Honesty",
   "critique_prompt": "Is this response truthful? Does it make claims the model can't verify? Does it present opinions as facts?",
   "revision_prompt": "Revise the response to be more honest, acknowledging uncertainty where appropriate."}
]
"""
"""The seed document's constitution, byte for byte."""

SEED_NAMES = ["Helpfulness", "Harmlessness", "Honesty"]


def endpoint(name: str, server: TestServer, model: str = "m") -> dict[str, Any]:
    return {"name": name, "backend": "openai", "model": model, "base_url": server.base_url}


def sl_recipe(run_dir: Path, groups: dict[str, list[dict[str, Any]]], **sl: Any) -> Recipe:
    return Recipe.model_validate({
        "run_dir": str(run_dir),
        "engine": {"groups": groups, "progress": "off",
                   "retry": {"max_attempts": 2, "initial_s": 0.01, "max_wait_s": 0.05}},
        "sl": {"input": str(PROMPTS), "limit": 3, "num_revisions": 1, **sl},
    })


def run(recipe: Recipe) -> dict[str, Any]:
    summary: dict[str, Any] = anyio.run(run_recipe, recipe)
    return summary


def test_seed_list_layout_loads_byte_for_byte_and_runs(tmp_path: Path, server: TestServer) -> None:
    path = tmp_path / "constitution.json"
    path.write_bytes(SEED_JSON.encode("utf-8"))
    constitution = load_constitution(path)
    assert [p.name for p in constitution.principles] == SEED_NAMES
    assert [p.priority for p in constitution.principles] == [0, 1, 2]  # file order is priority order
    assert constitution.draw == "all"
    assert constitution.principle("Honesty").revision.startswith("Revise the response to be more honest")
    # the same list in YAML (a top-level list) and in TOML ([[principles]] tables) is the same constitution
    items = json.loads(SEED_JSON)
    (tmp_path / "c.yaml").write_text("".join(
        f"- principle: {json.dumps(i['principle'])}\n  critique_prompt: {json.dumps(i['critique_prompt'])}\n"
        f"  revision_prompt: {json.dumps(i['revision_prompt'])}\n" for i in items), encoding="utf-8")
    (tmp_path / "c.toml").write_text("".join(
        f"[[principles]]\nprinciple = {json.dumps(i['principle'])}\ncritique_prompt = {json.dumps(i['critique_prompt'])}"
        f"\nrevision_prompt = {json.dumps(i['revision_prompt'])}\n\n" for i in items), encoding="utf-8")
    for other in ("c.yaml", "c.toml"):
        assert load_constitution(tmp_path / other).content_hash == constitution.content_hash

    summary = run(sl_recipe(tmp_path / "run", {"policy": [endpoint("srv", server)]}, constitution=str(path)))
    assert summary["stages"]["sl"]["ok"] == 3
    assert server.stats()["ok"] == 3 * (1 + 2 * 3)  # initial + every principle's critique and revision
    for row in read_shards(tmp_path / "run" / "sl").iter_rows(named=True):
        assert [r["principle"] for r in row["rounds"]] == SEED_NAMES
        assert [r["round"] for r in row["rounds"]] == [1, 1, 1]
        assert row["final_response"] == row["rounds"][-1]["revision"]


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ('[{"principle": "A", "critique_prompt": "c"}]', r"0: missing revision_prompt"),
        ('[{"principle": "A", "critique_prompt": "c", "revision_prompt": "r", "colour": 1}]',
         r"0: unknown key colour \(allowed: principle, critique_prompt"),
        ('["just text"]', r"0: expected a mapping"),
        ('[{"principle": "A", "critique_prompt": "c", "revision_prompt": "r"}, '
         '{"principle": "A", "critique_prompt": "d", "revision_prompt": "s"}]', "duplicate principle name"),
    ],
)
def test_seed_list_layout_errors_name_the_item(tmp_path: Path, text: str, pattern: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=pattern) as info:
        load_constitution(path)
    assert str(path) in str(info.value)


def test_a_constitution_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("principles:\n  - name: café\n    critique: c\n    revision: r\n".encode("latin-1"))
    out = cai("constitution", "show", str(path))
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert f"{path}: not UTF-8 text" in out.stderr and "re-save the file as UTF-8" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


METHOD_RECIPE = """\
constitution: {constitution}
num_revisions: 3
sl_epochs: 2
rl_algorithm: DPO
rl_learning_rate: 1.0e-5
principle_weights: {{Honesty: 0.5}}
sl:
  input: {prompts}
"""


def test_method_keys_are_accepted_at_the_top_level(tmp_path: Path) -> None:
    (tmp_path / "c.json").write_text(SEED_JSON, encoding="utf-8")
    path = tmp_path / "recipe.yaml"
    path.write_text(METHOD_RECIPE.format(constitution="c.json", prompts=PROMPTS), encoding="utf-8")
    recipe = load_recipe(path)
    assert recipe.sl is not None and recipe.train is not None
    assert recipe.sl.constitution == str(tmp_path / "c.json")  # resolved against the recipe's folder
    assert recipe.sl.num_revisions == 3 and recipe.sl.principle_weights == {"Honesty": 0.5}
    assert recipe.train.sl_epochs == 2 and recipe.train.rl_algorithm == "dpo"
    assert recipe.train.rl_learning_rate == 1e-5
    # command-line overrides reach the aliases too, and win over the file
    assert load_recipe(path, ["num_revisions=2"]).sl.num_revisions == 2  # type: ignore[union-attr]
    out = cai("config", str(path), "--set", "rl_algorithm=Soft_DPO")
    assert out.returncode == 0, out.stderr
    assert "rl_algorithm: soft_dpo" in out.stdout and "num_revisions: 3" in out.stdout


def test_a_method_key_given_twice_is_an_error_naming_both(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text("num_revisions: 2\nsl:\n  input: p.jsonl\n  num_revisions: 3\n", encoding="utf-8")
    out = cai("config", str(path))
    assert out.returncode == 2
    assert "num_revisions and sl.num_revisions are both given" in out.stderr


@pytest.mark.parametrize(
    ("value", "expected"),
    [("DPO", "dpo"), ("Soft-DPO", "soft_dpo"), ("GRPO", "grpo"), ("online_dpo", "online_dpo")],
)
def test_algorithm_names_are_case_insensitive(value: str, expected: str) -> None:
    from cai_async.train.config import TrainConfig

    assert TrainConfig.model_validate({"rl_algorithm": value}).rl_algorithm == expected


def test_algorithm_errors_list_only_what_is_allowed() -> None:
    from pydantic import ValidationError

    from cai_async.train.config import TrainConfig

    with pytest.raises(ValidationError) as unknown:
        TrainConfig.model_validate({"rl_algorithm": "sac"})
    message = str(unknown.value)
    assert "unknown rl_algorithm 'sac'" in message and "grpo" in message and "ppo" in message
    assert TrainConfig.model_validate({"rl_algorithm": "PPO"}).rl_algorithm == "ppo"  # through OpenRLHF


def test_draw_all_applies_every_principle_in_priority_order_and_weights_keep_their_meaning() -> None:
    seed = load_constitution("seed")
    assert seed.draw == "all"
    order = [p.name for p in sorted(seed.principles, key=lambda p: p.priority)]
    assert order[0] == "harmlessness" and order[-1] == "helpfulness"
    passes = draw_passes(seed, 3, rng=random.Random(0))
    assert [[p.name for p in one] for one in passes] == [order] * 3
    # weight: the share of passes that apply a principle, relative to the heaviest; 0 disables it
    weighted = seed.with_weights({"helpfulness": 0.5, "privacy": 0})
    counts: Counter[str] = Counter()
    for s in range(2000):
        for one in draw_passes(weighted, 1, rng=random.Random(s)):
            counts.update(p.name for p in one)
    assert counts["harmlessness"] == 2000 and counts["privacy"] == 0
    assert 900 < counts["helpfulness"] < 1100


def test_seed_builtin_applies_helpfulness_in_each_pass(tmp_path: Path, server: TestServer) -> None:
    summary = run(sl_recipe(tmp_path / "run", {"policy": [endpoint("srv", server)]}, constitution="seed",
                            num_revisions=2, limit=2))
    assert summary["stages"]["sl"]["ok"] == 2
    order = [p.name for p in sorted(load_constitution("seed").principles, key=lambda p: p.priority)]
    for row in read_shards(tmp_path / "run" / "sl").iter_rows(named=True):
        assert [r["principle"] for r in row["rounds"]] == order * 2
        assert [r["round"] for r in row["rounds"]] == [1] * 5 + [2] * 5
    assert server.stats()["ok"] == 2 * (1 + 2 * 2 * 5)


def test_early_stop_skips_a_principle_and_ends_the_chain_when_a_pass_changes_nothing(
    tmp_path: Path, server: TestServer
) -> None:
    server.configure(reply="No changes are needed.")
    summary = run(sl_recipe(tmp_path / "run", {"policy": [endpoint("srv", server)]}, constitution="seed",
                            num_revisions=3, limit=2, early_stop={"enabled": True}))
    assert summary["stages"]["sl"]["ok"] == 2
    for row in read_shards(tmp_path / "run" / "sl").iter_rows(named=True):
        assert row["stopped_early"] is True
        assert len(row["rounds"]) == 5 and all(r["early_stop"] and r["revision"] is None for r in row["rounds"])
    assert server.stats()["ok"] == 2 * (1 + 5)  # one pass of critiques, no revisions, no second pass


def test_critique_and_revision_come_from_different_groups(tmp_path: Path, server: TestServer) -> None:
    strong = start_server()
    try:
        groups = {"policy": [endpoint("policy-srv", server, "small")],
                  "critic": [endpoint("critic-srv", strong, "strong")]}
        summary = run(sl_recipe(tmp_path / "run", groups, constitution="seed", limit=2))
        assert summary["stages"]["sl"]["ok"] == 2
        rows = list(read_shards(tmp_path / "run" / "sl").iter_rows(named=True))
        for row in rows:
            assert row["initial_endpoint"] == "policy-srv"
            assert {r["critique_endpoint"] for r in row["rounds"]} == {"critic-srv"}
            assert {r["critique_model"] for r in row["rounds"]} == {"strong"}
            assert {r["revision_endpoint"] for r in row["rounds"]} == {"policy-srv"}
        assert strong.stats()["ok"] == 2 * 5  # critiques only
        assert server.stats()["ok"] == 2 * (1 + 5)  # initial responses and revisions
    finally:
        strong.process.terminate()
        strong.process.wait(timeout=10)


def test_built_in_constitutions_teach_with_examples(tmp_path: Path, server: TestServer) -> None:
    for name in ("seed", "harmless"):
        constitution = load_constitution(name)
        assert len(constitution.few_shot) >= 2
        assert all(p.contrast is not None for p in constitution.principles), name
        for p in constitution.principles:
            assert p.contrast is not None and p.contrast.good != p.contrast.bad
    server.configure(record=True)
    run(sl_recipe(tmp_path / "run", {"policy": [endpoint("srv", server)]}, constitution="seed", limit=1,
                  few_shot=1))
    seed = load_constitution("seed")
    requests = server.requests()
    critique = requests[1]
    assert critique[: len(seed.few_shot[0].messages())] == seed.few_shot[0].messages()
    first = sorted(seed.principles, key=lambda p: p.priority)[0]
    assert first.contrast is not None
    asked = critique[-1]["content"]
    assert "Good critique" in asked and first.contrast.good in asked and first.contrast.bad in asked
    assert asked.endswith(first.critique)
    row = next(read_shards(tmp_path / "run" / "sl").iter_rows(named=True))
    assert row["rounds"][0]["critique_request"] == asked
    # without few_shot, the plain request alone
    server.reset()
    run(sl_recipe(tmp_path / "plain", {"policy": [endpoint("srv", server)]}, constitution="seed", limit=1))
    assert server.requests()[1][-1]["content"] == first.critique


def _label_quality_pairs(path: Path) -> None:
    rows = []
    for index in range(4):
        human = f"\n\nHuman: How do I look after question {index}?"
        rows.append({"chosen": f"{human}\n\nAssistant: Here is a careful, kind answer {index}.",
                     "rejected": f"{human}\n\nAssistant: Figure it out yourself {index}."})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_constitution_card_with_a_run(tmp_path: Path, server: TestServer) -> None:
    run_dir = tmp_path / "run"
    run(sl_recipe(run_dir, {"policy": [endpoint("srv", server)]}, constitution="seed", limit=3))
    # a real label-quality report in the run (the test server plants a preference for (A))
    server.configure(prefer="A")
    pairs = tmp_path / "pairs.jsonl"
    _label_quality_pairs(pairs)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"run_dir": str(run_dir), "engine": {
        "groups": {"policy": [endpoint("srv", server)]}, "progress": "off"}}), encoding="utf-8")
    out = cai("label-quality", str(recipe), "--input", str(pairs), "--limit", "4")
    assert out.returncode == 0, out.stderr[-2000:]

    out = cai("constitution", "card", "seed", "--run", str(run_dir))
    assert out.returncode == 0, out.stderr
    markdown = (run_dir / "card" / "card.md").read_text(encoding="utf-8")
    page = (run_dir / "card" / "card.html").read_text(encoding="utf-8")
    seed = load_constitution("seed")
    assert seed.content_hash in markdown and seed.content_hash in page
    positions = [markdown.index(f"### {p.name}") for p in sorted(seed.principles, key=lambda p: p.priority)]
    assert positions == sorted(positions)
    data = card_data("seed", run_dir=run_dir)
    assert data["run"]["chains"] == 3 and data["run"]["matched_by"] == "hash"
    stats = data["run"]["principles"]
    assert all(s["applied"] == 3 and s["revisions"] == 3 for s in stats.values())
    assert all(0 < s["mean_change"] <= 1 for s in stats.values())
    gates = data["run"]["gates"]  # every revision checked; the test server's all pass
    assert (gates["revision_steps"], gates["first_failed"], gates["rejected"]) == (15, 0, 0)
    assert all(s["rejected"] == 0 for s in stats.values())
    assert "| rejected by gates |" in markdown and "15 revisions checked: 0 (0.0%) failed a gate" in markdown
    assert "<h3>Revision quality gates</h3>" in page
    quality = data["run"]["label_quality"]
    assert quality["pairs"] > 0 and quality["per_principle"]
    assert "AI-feedback label quality" in markdown and quality["per_principle"][0]["variant"] in page
    assert "<script" not in page and "http" not in page.split("</style>")[1]

    browser = shutil.which("chromium")
    if browser is None:
        pytest.skip("chromium is not installed (make test installs Debian's chromium package when it can)")
    shot = tmp_path / "card.png"
    rendered = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
         "--window-size=1000,1400", f"--screenshot={shot}", (run_dir / "card" / "card.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert shot.is_file() and shot.stat().st_size > 20_000, rendered.stderr[-2000:]
    console = [line for line in rendered.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == [], console


def test_card_of_a_file_without_a_run(tmp_path: Path) -> None:
    (tmp_path / "c.json").write_text(SEED_JSON, encoding="utf-8")
    paths = write_card(str(tmp_path / "c.json"), tmp_path / "out")
    markdown = paths["markdown"].read_text(encoding="utf-8")
    assert all(f"### {name}" in markdown for name in SEED_NAMES)
    assert "In run" not in markdown
    assert json.loads(paths["json"].read_text(encoding="utf-8"))["draw"] == "all"
