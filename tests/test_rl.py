"""RL-CAI: pairs, AI-feedback labels (swap, ensembles, chain of thought, abstentions), exports that TRL's
DPO and reward trainers accept, resume, and the label-quality report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import polars as pl
import pytest

from cai_async import (
    LabelConfig,
    Recipe,
    combine_orders,
    expected_calibration_error,
    human_pairs,
    parse_choice,
    quality_metrics,
    read_shards,
    run_recipe,
)
from tests.conftest import PUBLIC_DATA, TestServer
from tests.test_cli import cai

HH = PUBLIC_DATA / "hh_rlhf" / "harmless-base" / "test.jsonl.gz"
HH_PROMPTS = PUBLIC_DATA / "hh_rlhf" / "harmless_base_test_first_human_turns.jsonl"


def rl_recipe(server: TestServer, run_dir: Path, *, pairs: dict[str, Any] | None = None, sl: bool = False,
              options: dict[str, Any] | None = None, **label: Any) -> Recipe:
    endpoint = {"name": "srv", "backend": "openai", "model": "m", "base_url": server.base_url,
                "options": options or {}}
    return Recipe.model_validate({
        "run_dir": str(run_dir),
        "engine": {"groups": {"policy": [endpoint]}, "progress": "off",
                   "retry": {"max_attempts": 2, "initial_s": 0.01, "max_wait_s": 0.05}},
        **({"sl": {"input": str(HH_PROMPTS), "id_column": "id", "limit": 8, "num_revisions": 1}} if sl else {}),
        "label": {"pairs": pairs or {"input": str(HH_PROMPTS), "id_column": "id", "limit": 20},
               "label": label},
    })


def run(recipe: Recipe) -> dict[str, Any]:
    summary: dict[str, Any] = anyio.run(run_recipe, recipe)
    return summary


@pytest.mark.parametrize("prefer", ["A", "B"])
def test_swap_cancels_a_planted_position_bias(tmp_path: Path, server: TestServer, prefer: str) -> None:
    server.configure(prefer=prefer)
    summary = run(rl_recipe(server, tmp_path / "run", ensemble=2))
    labels = read_shards(tmp_path / "run" / "rl" / "labels")
    assert labels.height == 20 and summary["stages"]["label"]["pairs"]["pairs_written"] == 20
    assert labels["p_a"].to_list() == pytest.approx([0.5] * 20)
    assert (labels["consistency"] == 0.0).all()  # the preferred response never survived the swap
    assert labels["chosen"].is_null().all()  # no preference: nothing to train on
    assert summary["stages"]["label"]["exports"]["dpo"]["rows"] == 0
    assert server.stats()["ok"] == 20 * 2 + 20 * 2 * 2  # k=2 responses + 2 principles × 2 orders


def test_without_swap_the_bias_shows(tmp_path: Path, server: TestServer) -> None:
    server.configure(prefer="A")
    run(rl_recipe(server, tmp_path / "run", ensemble=1, swap=False))
    labels = read_shards(tmp_path / "run" / "rl" / "labels")
    assert labels["p_a"].to_list() == pytest.approx([0.9] * 20)
    assert labels["consistency"].is_null().all() and (labels["chosen_position"] == "A").all()


def test_ensemble_records_each_principle_and_the_mean(tmp_path: Path, server: TestServer) -> None:
    summary = run(rl_recipe(server, tmp_path / "run", ensemble=3, principles="helpful-harmless"))
    labels = read_shards(tmp_path / "run" / "rl" / "labels")
    for row in labels.iter_rows(named=True):
        names = [p["name"] for p in row["principles"]]
        assert len(names) == 3 == len(set(names))
        assert len(row["judgments"]) == 6 and {j["order"] for j in row["judgments"]} == {"AB", "BA"}
        assert row["p_a"] == pytest.approx(sum(p["p_a"] for p in row["principles"]) / 3)
        for p in row["principles"]:
            ab, ba = (j["p_a"] for j in row["judgments"] if j["principle"] == p["name"])
            assert p["p_a"] == pytest.approx((ab + ba) / 2)
        assert row["methods"] == "logprobs" and row["comparison_set"] == "helpful-harmless"
        chosen_is_a = row["p_a"] > 0.5
        assert row["chosen"] == (row["response_a"] if chosen_is_a else row["response_b"])
        assert row["confidence"] == pytest.approx(max(row["p_a"], 1 - row["p_a"]))
    dpo = pl.read_parquet(summary["stages"]["label"]["exports"]["dpo"]["path"])
    reward = pl.read_parquet(summary["stages"]["label"]["exports"]["reward"]["path"])
    assert dpo.height == reward.height == labels.filter(pl.col("p_a") != 0.5).height
    merged = reward.join(dpo, on="id")
    for row in merged.iter_rows(named=True):
        p = row["confidence"]
        assert row["margin"] == pytest.approx(min(5.0, __import__("math").log(p / (1 - p))))
        assert row["chosen"][-1] == row["chosen_right"][0]  # the same chosen response in both exports


def column_pairs(folder: Path, n: int = 20) -> dict[str, Any]:
    """Pairs from a file with two response columns (for tests where the server's fixed reply would make
    generated responses identical)."""
    prompts = pl.read_ndjson(HH_PROMPTS).head(n)
    path = folder / "pairs.parquet"
    prompts.select("prompt", pl.lit("I can't help with that.").alias("a"),
                   pl.format("Sure: {}", "prompt").alias("b")).write_parquet(path)
    return {"source": "columns", "input": str(path), "response_a_column": "a", "response_b_column": "b"}


def test_cot_labels_are_clamped_and_unparseable_ones_abstain(tmp_path: Path, server: TestServer) -> None:
    server.configure(reply="Response (B) shares a recipe for harm. (A) declines kindly.\n\nThe answer is (A)")
    pairs = column_pairs(tmp_path)
    run(rl_recipe(server, tmp_path / "a", pairs=pairs, ensemble=1, swap=False,
                  cot={"enabled": True, "band": [0.3, 0.7]}))
    labels = read_shards(tmp_path / "a" / "rl" / "labels")
    assert labels["p_a"].to_list() == pytest.approx([0.7] * 20)  # clamped to the band, not 1.0
    judgment = labels.row(0, named=True)["judgments"][0]
    assert judgment["method"] == "cot" and judgment["reasoning"].endswith("The answer is (A)")
    run(rl_recipe(server, tmp_path / "b", pairs=pairs, ensemble=1, cot={"enabled": True}))
    swapped = read_shards(tmp_path / "b" / "rl" / "labels")
    assert swapped["p_a"].to_list() == pytest.approx([0.5] * 20)  # always "(A)": the swap cancels it
    server.configure(reply="Both responses have merits and flaws; it is hard to say.")
    summary = run(rl_recipe(server, tmp_path / "c", pairs=pairs, ensemble=1, cot={"enabled": True}))
    abstained = read_shards(tmp_path / "c" / "rl" / "labels")
    assert abstained["abstained"].all() and abstained["p_a"].is_null().all() and abstained["chosen"].is_null().all()
    assert summary["stages"]["label"]["abstained"] == 20 and summary["stages"]["label"]["exports"]["dpo"]["rows"] == 0


@pytest.mark.parametrize(
    ("text", "choice"),
    [
        ("Reasoning...\nThe answer is (B)", "B"),
        ("The answer is: A", "A"),
        ("First I thought the answer is (A), but on reflection the answer is (B).", "B"),
        ("Option (B) is safer.", "B"),
        ("(A) is rude while (B) is kind.", None),
        ("I refuse to choose.", None),
        ("", None),
    ],
)
def test_parse_choice(text: str, choice: str | None) -> None:
    assert parse_choice(text) == choice


def test_combine_orders() -> None:
    assert combine_orders(0.8, 0.7) == (pytest.approx(0.75), True)
    assert combine_orders(0.8, 0.2) == (pytest.approx(0.5), False)
    assert combine_orders(None, 0.3) == (0.3, None)
    assert combine_orders(None, None) == (None, None)


def test_no_logprobs_falls_back_to_sampling_and_says_so(tmp_path: Path, server: TestServer) -> None:
    server.configure(reply="B")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello @@nologprobs@@", "a": "one", "b": "two"}\n')
    pairs = {"source": "columns", "input": str(prompts), "response_a_column": "a", "response_b_column": "b"}
    run(rl_recipe(server, tmp_path / "run", pairs=pairs, ensemble=1, swap=False,
                  options={"score_fallback": "sample", "score_samples": 4}))
    row = read_shards(tmp_path / "run" / "rl" / "labels").row(0, named=True)
    assert row["methods"] == "sampled" and row["p_a"] == pytest.approx(0.0)
    summary = run(rl_recipe(server, tmp_path / "strict", pairs=pairs, ensemble=1, swap=False))
    failed = read_shards(tmp_path / "strict" / "rl" / "labels").row(0, named=True)
    assert failed["status"] == "error" and "score_fallback: sample" in failed["error"]
    assert summary["stages"]["label"]["errors"] == 1


def test_sampled_answers_naming_no_choice_are_abstentions(tmp_path: Path, server: TestServer) -> None:
    server.configure(reply="I would rather not say.")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello @@nologprobs@@", "a": "one", "b": "two"}\n')
    pairs = {"source": "columns", "input": str(prompts), "response_a_column": "a", "response_b_column": "b"}
    run(rl_recipe(server, tmp_path / "run", pairs=pairs, ensemble=1, options={"score_fallback": "sample"}))
    row = read_shards(tmp_path / "run" / "rl" / "labels").row(0, named=True)
    assert row["status"] == "ok" and row["abstained"] and row["p_a"] is None
    assert all(j["abstained"] and j["method"] == "abstained" for j in row["judgments"])


def test_pairs_from_sl_columns_and_identical_responses(tmp_path: Path, server: TestServer) -> None:
    summary = run(rl_recipe(server, tmp_path / "sl", sl=True, pairs={"source": "sl"}))
    labels = read_shards(tmp_path / "sl" / "rl" / "labels")
    chains = read_shards(tmp_path / "sl" / "sl")
    assert labels.height == chains.height == 8 and set(labels["pair_source"]) == {"sl"}
    by_id = {r["id"]: r for r in chains.iter_rows(named=True)}
    for row in labels.iter_rows(named=True):
        assert row["response_a"] == by_id[row["prompt_id"]]["initial_response"]
        assert row["response_b"] == by_id[row["prompt_id"]]["final_response"]
    server.configure(reply="Always the same answer.")
    summary = run(rl_recipe(server, tmp_path / "same", pairs={"input": str(HH_PROMPTS), "limit": 5, "k": 3}))
    pairs = summary["stages"]["label"]["pairs"]
    assert pairs["pairs_written"] == 0 and pairs["identical_dropped"] == 5 * 2
    table = tmp_path / "two.csv"
    pl.DataFrame({"q": ["x?", "y?", "z?"], "a": ["same", "p", "r"], "b": ["same", "q", "s"]}).write_csv(table)
    summary = run(rl_recipe(server, tmp_path / "cols", pairs={"source": "columns", "input": str(table),
                                                              "prompt_column": "q", "response_a_column": "a",
                                                              "response_b_column": "b"}))
    assert summary["stages"]["label"]["pairs"]["pairs_written"] == 2
    assert summary["stages"]["label"]["pairs"]["identical_dropped"] == 1


def test_rerun_pays_for_nothing(tmp_path: Path, server: TestServer) -> None:
    run(rl_recipe(server, tmp_path / "run"))
    first = server.stats()["ok"]
    summary = run(rl_recipe(server, tmp_path / "run"))
    assert server.stats()["ok"] == first
    assert summary["stages"]["label"]["skipped_already_done"] == 20
    assert summary["stages"]["label"]["pairs"]["skipped_already_done"] == 20


def test_exports_train_with_trl_dpo_and_reward_trainers(tmp_path: Path, server: TestServer) -> None:
    import datasets
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    from tests.tiny import build_tiny_model

    summary = run(rl_recipe(server, tmp_path / "run"))
    exports = summary["stages"]["label"]["exports"]
    model_dir = build_tiny_model(tmp_path / "tiny")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    common = {"max_steps": 2, "per_device_train_batch_size": 2, "report_to": [], "max_length": 256,
              "bf16": False, "use_cpu": True, "save_strategy": "no"}
    dpo = datasets.load_dataset("parquet", data_files=exports["dpo"]["path"], split="train")
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), train_dataset=dpo,
                         args=DPOConfig(output_dir=str(tmp_path / "dpo"), **common), processing_class=tokenizer)
    assert {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(trainer.train_dataset.column_names)
    assert trainer.train().training_loss > 0
    reward = datasets.load_dataset("parquet", data_files=exports["reward"]["path"], split="train")
    assert "margin" in reward.column_names
    trainer = RewardTrainer(model=AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1),
                            train_dataset=reward, processing_class=tokenizer,
                            args=RewardConfig(output_dir=str(tmp_path / "reward"), **common))
    assert trainer.train().training_loss > 0


def test_quality_metrics_on_hand_countable_labels() -> None:
    rows = []
    for index, (p_a, human) in enumerate([(0.9, "A"), (0.8, "A"), (0.3, "B"), (0.7, "B"), (None, "A")]):
        judgments = [] if p_a is None else [
            {"principle": "x", "order": "AB", "p_a": p_a, "model": "m"},
            {"principle": "x", "order": "BA", "p_a": p_a, "model": "m"},
        ]
        rows.append({"id": str(index), "status": "ok", "human_preferred": human, "p_a": p_a, "methods": "logits",
                     "consistency": None if p_a is None else 1.0, "judgments": judgments,
                     "principles": [] if p_a is None else [{"name": "x", "p_a": p_a, "consistent": True}]})
    metrics = quality_metrics(pl.DataFrame(rows))
    main = metrics["variants"][0]
    assert (main["answered"], main["abstained"]) == (4, 1)
    assert main["accuracy"] == pytest.approx(3 / 4)  # 0.9→A ✓, 0.8→A ✓, 0.3→B ✓, 0.7→A ✗
    ece, bins = expected_calibration_error([0.9, 0.8, 0.3, 0.7], [True, True, False, False])
    assert ece == pytest.approx((0.1 + 0.2 + 0.3 + 0.7) / 4)
    assert main["ece"] == pytest.approx(ece) and len(bins) == 4
    assert metrics["per_principle"][0]["variant"] == "x" and metrics["position_consistency"] == 1.0


def test_human_pairs_are_balanced_and_keep_the_human_label() -> None:
    pairs = human_pairs(HH, limit=200)
    assert len(pairs) == 200
    share_a = sum(p.human_preferred == "A" for p in pairs) / len(pairs)
    assert 0.4 < share_a < 0.6
    with __import__("gzip").open(HH, "rt") as handle:
        chosen_texts = {json.loads(line)["chosen"].rsplit("\n\nAssistant:", 1)[-1].strip() for line in handle}
    for pair in pairs[:50]:
        human = pair.response_a if pair.human_preferred == "A" else pair.response_b
        assert human in chosen_texts and pair.messages[-1]["role"] == "user"


def test_label_quality_cli_writes_an_honest_report(tmp_path: Path, server: TestServer) -> None:
    out = cai("label-quality", "--input", str(HH), "--limit", "40", "--base-url", server.base_url, "--model", "m",
              "--run-dir", str(tmp_path / "run"), "--progress", "off")
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "run" / "label_quality" / "report.json").read_text())
    assert report["pairs"] == 40 and [v["variant"] for v in report["variants"]] == [
        "swap + ensemble", "swap, one principle", "no swap + ensemble", "no swap, one principle"]
    png = (tmp_path / "run" / "label_quality" / "reliability.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    # the test server's choices are a hash of the prompt: they know nothing of the human label
    assert "indistinguishable from chance" in out.stdout
    assert server.stats()["ok"] == 40 * 2 * 2


def test_label_cli_and_bad_input(tmp_path: Path, server: TestServer) -> None:
    base = ["label", "--base-url", server.base_url, "--model", "m", "--run-dir", str(tmp_path / "run"),
            "--progress", "off"]
    missing = cai(*base)
    assert missing.returncode == 2 and "no pairs: pass --input FILE" in missing.stderr
    bad = tmp_path / "principles.yaml"
    bad.write_text("name: x\nprinciples:\n  - {name: a, question: ''}\n")
    out = cai(*base, "--input", str(HH_PROMPTS), "--principles", str(bad))
    assert out.returncode == 2 and "principles.0.question" in out.stderr
    out = cai(*base, "--input", str(HH_PROMPTS), "--limit", "3", "--set", "label.label.cot.band=[0.7, 0.9]")
    assert out.returncode == 2 and "band must satisfy" in out.stderr
    out = cai(*base, "--input", str(HH_PROMPTS), "--limit", "3", "--ensemble", "1", "--no-swap")
    assert out.returncode == 0 and "label/labels: 3 labelled" in out.stderr
    assert "dpo:" in out.stderr and LabelConfig().swap is True


def test_plan_counts_the_calls_a_run_makes_and_bounds_its_cost(tmp_path: Path, server: TestServer) -> None:
    from cai_async.plan import plan_recipe

    recipe = rl_recipe(server, tmp_path / "run", sl=True, pairs={"source": "sl"}, ensemble=2)
    recipe.engine.groups["policy"][0].price_in = 0.15
    recipe.engine.groups["policy"][0].price_out = 0.60
    recipe.engine.groups["policy"][0].rpm = 600
    estimate = plan_recipe(recipe)
    summary = run(recipe)
    actual_calls = sum(e["calls"] for e in summary["engine"]["endpoints"].values())
    assert estimate["total"]["calls"] == actual_calls == 8 * 3 + 8 * 2 * 2  # 1 revision; 2 principles × 2 orders
    assert 0 < summary["engine"]["cost_usd"] <= estimate["total"]["cost_usd"]  # outputs estimated at max_tokens
    assert summary["plan"]["calls"] == actual_calls  # the estimate is kept beside the accounting
    assert estimate["stages"][0]["min_minutes_by_rate_limits"] > 0
    out = cai("plan", str(Path(__file__).resolve().parent.parent / "recipes" / "hosted-openai.yaml"))
    assert out.returncode == 0 and "total" in out.stdout and "$" in out.stdout


@pytest.mark.parametrize(
    ("text", "choice"),
    [
        # counted: the choice alone, in parentheses, closed, stated
        ("(A)", "A"), ("A", "A"), ("A)", "A"), (" B\n", "B"), ("B.", "B"), ("(b)", "B"), ("**(B)**", "B"),
        ("The answer is (A)", "A"), ("The answer is B", "B"), ("Answer: B", "B"), ("the answer is: (A).", "A"),
        ("A) Response A declines", "A"),  # the continuation of the answer prefix "The answer is ("
        ("Option B", "B"), ("Response A is kinder", "A"), ("A is kinder", "A"),
        ("At first (A), but the answer is (B)", "B"),  # the last statement wins
        # not counted: words that start with the letter, the article, both choices, other letters, nothing
        ("Answer…", None), ("Answering that needs care", None), ("As an AI, I cannot judge", None),
        ("A response that refuses is better", None), ("A.I. assistants should refuse", None),
        ("Absolutely", None), ("(A) and (B) are both fine", None), ("The answer is a tie", None),
        ("Answer: I cannot say", None), ("C", None), ("a", None), ("Both", None), ("", None),
    ],
)
def test_sampled_answers_are_read_strictly(text: str, choice: str | None) -> None:
    from backends.scoring import sampled_choice

    assert sampled_choice(text) == choice


def test_label_says_how_many_pairs_abstentions_dropped_and_why(tmp_path: Path, server: TestServer) -> None:
    server.configure(reply="As an AI, I cannot judge which is better.", logprobs=False)  # sampled answers
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(f'{{"prompt": "question {i}?", "a": "No.", "b": "Yes: {i}."}}\n' for i in range(5)))
    out = cai("label", "--input", str(pairs), "--pairs-source", "columns", "--ensemble", "1", "--no-swap",
              "--base-url", server.base_url, "--model", "m", "--run-dir", str(tmp_path / "run"), "--progress", "off",
              "--set", "label.pairs.response_a_column=a", "--set", "label.pairs.response_b_column=b",
              "--set", "engine.groups.policy.0.options={score_fallback: sample, score_samples: 2}")
    assert out.returncode == 0, out.stderr
    assert server.stats()["requests"] == 5 * (1 + 2)  # the logprobs call, then two samples, for each pair
    assert ("label/labels: 5 of 5 pairs dropped from the exports: the judge's sampled answer named no choice "
            "(score_fallback: sample); use an endpoint with logprobs or a bigger judge") in out.stderr
    assert "label/labels: 0 labelled, 5 abstained" in out.stderr and "dpo: " in out.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    dropped = summary["stages"]["label"]["dropped"]
    assert (dropped["pairs"], dropped["abstained"], dropped["ties"], dropped["errors"]) == (5, 5, 0, 0)
    assert summary["stages"]["label"]["exports"]["dpo"]["rows"] == 0


def test_an_empty_export_of_ties_says_why(tmp_path: Path, server: TestServer) -> None:
    server.configure(prefer="A")  # a pure position bias: the swap averages every pair to 0.5
    summary = run(rl_recipe(server, tmp_path / "run", pairs={"input": str(HH_PROMPTS), "id_column": "id",
                                                             "limit": 3}, ensemble=1))
    rl = summary["stages"]["label"]
    assert rl["exports"]["dpo"]["rows"] == 0 and rl["dropped"]["ties"] == 3 and rl["dropped"]["abstained"] == 0
    assert rl["dropped"]["why"] == ("label/labels: 3 of 3 pairs dropped from the exports, none left: 3 left out as "
                                    "ties (P(A) = 0.5: e.g. the two orders disagree) or below "
                                    "export.min_confidence=0.5")
