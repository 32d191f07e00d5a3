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
