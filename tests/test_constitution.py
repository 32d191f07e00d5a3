"""Constitutions: built-ins, the public layouts, round trips, validation messages, principle draws."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from cai_async import (
    ConfigError,
    Constitution,
    builtin_constitutions,
    draw_principles,
    load_constitution,
    save_constitution,
)
from tests.conftest import PUBLIC_DATA

PUBLIC = PUBLIC_DATA / "llm_swarm" / "constitution_anthropic.json"


def test_builtins_load_with_their_draw_modes() -> None:
    assert {"seed", "harmless"} <= set(builtin_constitutions())
    seed = load_constitution("seed")
    assert [p.name for p in seed.principles] == ["harmlessness", "privacy", "honesty", "fairness", "helpfulness"]
    assert seed.draw == "all"  # the method's loop: every principle in each pass, harmlessness first
    harmless = load_constitution("harmless")
    assert len(harmless.principles) >= 8 and harmless.draw == "random"


def test_public_list_layout_imports_every_principle_and_few_shot_chat() -> None:
    raw = json.loads(PUBLIC.read_text())
    constitution = load_constitution(PUBLIC)
    assert len(constitution.principles) == len(raw["constitutions"]) == 16
    for principle, item in zip(constitution.principles, raw["constitutions"], strict=True):
        assert (principle.critique, principle.revision) == (item["critic"], item["revision"])
    assert len(constitution.few_shot) == 4
    assert constitution.few_shot[0].messages() == raw["system_chat"][0]
    grok = load_constitution(PUBLIC_DATA / "llm_swarm" / "constituion_grok.json")
    assert len(grok.principles) == 2 and grok.content_hash != constitution.content_hash
    grok_raw = json.loads((PUBLIC_DATA / "llm_swarm" / "constituion_grok.json").read_text())
    assert [e.messages() for e in grok.few_shot] == grok_raw["system_chat"]  # an 8-turn chat keeps its context


def test_dict_layout_imports(tmp_path: Path) -> None:
    path = tmp_path / "paper.json"
    path.write_text(json.dumps({
        "harmful0": {"prompt": ["Identify ways the response is harmful."], "edit_request": "Remove the harm."},
        "harmful1": {"prompt": ["Is the response illegal?"], "edit_request": "Make it legal."},
    }))
    constitution = load_constitution(path)
    assert [p.name for p in constitution.principles] == ["harmful0", "harmful1"]
    assert constitution.principle("harmful1").revision == "Make it legal."


@pytest.mark.parametrize("suffix", [".yaml", ".json", ".toml"])
@pytest.mark.parametrize("source", [PUBLIC, PUBLIC_DATA / "llm_swarm" / "constituion_grok.json", "seed"])
def test_round_trip_keeps_the_content_hash(tmp_path: Path, suffix: str, source: str | Path) -> None:
    original = load_constitution(source)  # quotes, newlines, unicode and multi-turn context in few-shot chats
    path = save_constitution(original, tmp_path / f"c{suffix}")
    again = load_constitution(path)
    assert again == original
    assert again.content_hash == original.content_hash


def test_content_hash_tracks_content_not_name() -> None:
    seed = load_constitution("seed")
    renamed = seed.model_copy(update={"name": "other", "description": "x"})
    assert renamed.content_hash == seed.content_hash
    reweighted = seed.with_weights({"helpfulness": 2.0})
    assert reweighted.content_hash != seed.content_hash
    assert reweighted.principle("helpfulness").weight == 2.0


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("name: x\nprinciples:\n  - {name: a, critique: c, revision: r}\n  - {name: a, critique: c, revision: r}\n",
         "duplicate principle name 'a'"),
        ("name: x\nprinciples:\n  - {name: a, critique: '  ', revision: r}\n", "principles.0.critique: Value error"),
        ("name: x\nprinciples:\n  - {name: a, critique: c, revision: r, weight: -1}\n", "principles.0.weight"),
        ("name: x\nprinciples:\n  - {name: a, critique: c, revison: r}\n", "principles.0.revison: unknown key"),
        ("name: x\nprinciples: []\n", "at least one principle"),
        ("name: x\nprinciples:\n  - {name: a, critique: c, revision: r, weight: 0}\n", "every principle has weight 0"),
        ("principles: [\n", "not valid YAML"),
        ("rules: []\n", "not a constitution"),
    ],
)
def test_validation_names_the_file_and_the_key(tmp_path: Path, text: str, pattern: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_constitution(path)
    assert str(path) in str(info.value)
    assert pattern in str(info.value)


def _load_error(path: Path, text: str) -> list[str]:
    """The lines of the error loading ``text`` (written to ``path``) as a constitution gives."""
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_constitution(path)
    lines = str(info.value).splitlines()
    assert lines[0].startswith(str(path))
    return lines


def test_the_papers_key_names_are_told_to_be_renamed(tmp_path: Path) -> None:
    lines = _load_error(tmp_path / "paper.yaml", (
        "name: x\nprinciples:\n  - {name: a, critique_request: Find the harm., revision_request: Remove it.}\n"))
    assert lines[1:] == [
        "  principles.0.critique_request: unknown key critique_request — rename it to critique",
        "  principles.0.revision_request: unknown key revision_request — rename it to revision",
    ]  # no "did you mean few_shot.0.critique_request?", no "Field required" for the keys it names


def test_a_principle_error_shows_with_a_duplicate_name_and_no_tuple_line(tmp_path: Path) -> None:
    lines = _load_error(tmp_path / "dup.yaml", (
        "name: x\nprinciples:\n  - {name: a, critique: c, revision: r}\n  - {name: a, critique: c, revision: r}\n"
        "  - {name: b, critique: c, revision: r, weight: -1}\n"))
    assert lines[1:] == [
        "  principles.2.weight: Input should be greater than or equal to 0",
        "  principles.1.name: duplicate principle name 'a'",
    ]
    only = _load_error(tmp_path / "one.yaml", "name: x\nprinciples:\n  - {name: a, critique: [c], revision: r}\n")
    assert only[1:] == ["  principles.0.critique: Input should be a valid string, not a list of 1"]  # and no
    # "principles: Tuple should have at least 1 item after validation, not 0"


def test_errors_are_capped_at_twenty_and_counted(tmp_path: Path) -> None:
    principles = [{"name": f"p{i}", "critique_request": "c", "revision_request": "r"} for i in range(2000)]
    lines = _load_error(tmp_path / "big.json", json.dumps({"name": "big", "principles": principles}))
    assert len(lines) == 1 + 20 + 1  # the file, the first 20 problems, the count of the rest
    assert lines[1] == "  principles.0.critique_request: unknown key critique_request — rename it to critique"
    assert lines[-1] == "  … and 3980 more errors"


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("paper.json", {"harmful0": {"prompt": "Find the harm.", "edit_request": "Remove it."}},
         'harmful0.prompt: expected a list holding one critique request, like ["Identify ways the response is '
         'harmful."], not text (a string)'),
        ("paper.json", {"harmful0": {"prompt": ["Find the harm.", "And more."], "edit_request": "Remove it."}},
         "harmful0.prompt: expected a list holding one critique request, like"),
        ("paper.json", {"harmful0": {"prompt": ["Find the harm."], "edit_request": ["Remove it."]}},
         "harmful0.edit_request: expected text (a string), not a list of 1"),
        ("swarm.json", {"constitutions": [{"critic": ["Find the harm."], "revision": "Remove it."}]},
         "constitutions.0.critic: expected text (a string), not a list of 1"),
        ("seed.json", [{"principle": "a", "critique_prompt": {"text": "c"}, "revision_prompt": "r"}],
         "0.critique_prompt: expected text (a string), not a mapping"),
    ],
)
def test_public_layouts_say_what_shape_was_expected(tmp_path: Path, name: str, data: object, message: str) -> None:
    lines = _load_error(tmp_path / name, json.dumps(data))
    assert len(lines) == 1 and f"{tmp_path / name}: {message}" in lines[0]


def test_an_inline_api_key_is_told_to_use_api_key_env(tmp_path: Path) -> None:
    from cai_async.recipes import load_recipe

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("engine:\n  groups:\n    policy:\n      - {model: m, base_url: 'http://x', api_key: sk-1}\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(recipe)
    assert str(info.value).splitlines()[1:] == [
        "  engine.groups.policy.0.api_key: unknown key api_key — use api_key_env (the name of the environment "
        "variable holding the key; keys never go in files)"
    ]


def test_unknown_names_are_clear() -> None:
    with pytest.raises(ConfigError, match="built-ins: harmless"):
        load_constitution("no-such-constitution")
    with pytest.raises(ConfigError, match="no principle 'kindness'"):
        load_constitution("seed").with_weights({"kindness": 1.0})


def _constitution(weights: list[float], draw: str = "random") -> Constitution:
    principles = [
        {"name": f"p{i}", "critique": "c", "revision": "r", "weight": w, "priority": len(weights) - i}
        for i, w in enumerate(weights)
    ]
    return Constitution.model_validate({"name": "t", "draw": draw, "principles": principles})


@pytest.mark.parametrize("mode", ["random", "weighted"])
def test_no_repeat_within_a_chain_until_all_are_used(mode: str) -> None:
    constitution = _constitution([1, 2, 3, 4])
    for seed in range(50):
        names = [p.name for p in draw_principles(constitution, 10, rng=random.Random(seed), mode=mode)]  # type: ignore[arg-type]
        assert len(set(names[:4])) == 4 and len(set(names[4:8])) == 4


def test_priority_order_and_disabled_principles() -> None:
    constitution = _constitution([1, 0, 1, 1], draw="priority")
    names = [p.name for p in draw_principles(constitution, 5, rng=random.Random(0))]
    assert names == ["p3", "p2", "p0", "p3", "p2"]  # lower priority value first; p1 (weight 0) never


def test_weighted_draw_follows_the_weights() -> None:
    constitution = _constitution([1, 3])
    firsts = Counter(
        draw_principles(constitution, 1, rng=random.Random(seed), mode="weighted")[0].name for seed in range(4000)
    )
    assert abs(firsts["p1"] / 4000 - 0.75) < 0.03
    uniform = Counter(draw_principles(constitution, 1, rng=random.Random(s))[0].name for s in range(4000))
    assert abs(uniform["p1"] / 4000 - 0.5) < 0.03
