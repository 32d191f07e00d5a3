"""Every user-facing path of the ``cai`` command once, end to end, as a user runs it (a subprocess): the quickstart
pipeline (sl → label → train → eval, the trained model answering through the transformers backend), ``cai train``
reward / dpo / rl (grpo, rloo, online_dpo), ``cai guard serve`` with the classifier tier and with a Llama-Guard
tier, ``cai run`` with ``executor: ray``, ``cai label --cot`` and ``cai plan --batch``; and the exports of a planted
run against row counts worked out by hand (an export that writes an empty file fails here). The endpoints are
the test server (``tests/server.py``), the models the tiny Llama of ``tests/tiny.py`` and a tiny BERT; every
assertion is on what the command wrote or said: rows and columns, losses, rewards, verdicts, calls, exit codes."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml

from cai_async import read_shards
from cai_async.exports import (
    ExportConfig,
    RLExportConfig,
    dpo_frame,
    pairs_frame,
    reward_frame,
    sft_frame,
    write_rl_exports,
    write_sl_exports,
)
from tests.conftest import ROOT, TestServer, start_server
from tests.test_cli import cai
from tests.test_ray_executor import _gone

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama (and its locally trained tokenizer) every training command here starts from."""
    from tests.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


def _finite(values: list[Any]) -> bool:
    return bool(values) and all(isinstance(v, int | float) and math.isfinite(v) for v in values)


def _write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _endpoint(server: TestServer, name: str, model: str = "m") -> dict[str, Any]:
    return {"name": name, "backend": "openai", "model": model, "base_url": server.base_url}


# --- the quickstart pipeline ---------------------------------------------------------------------------------


def test_the_quickstart_pipeline_sl_label_train_eval(tmp_path: Path, server: TestServer, tiny: Path) -> None:
    """recipes/quickstart.yaml as it ships, with only its models swapped: the test server for the GGUF (policy,
    critic, "before") and the tiny Llama for SmolLM2 in training; the "after" model is what the train stage
    merged, answering in-process through the transformers backend."""
    from cai_async.constitution_io import load_constitution

    recipe = yaml.safe_load(QUICKSTART.read_text(encoding="utf-8"))
    groups = recipe["engine"]["groups"]
    # what this test relies on, so that a change to the quickstart shows here
    assert recipe["train"]["stages"] == ["sft"] and recipe["train"]["merge"] is True
    assert groups["after"][0]["backend"] == "transformers" and recipe["eval"]["compare"] == ["before", "after"]
    here = QUICKSTART.parent
    run_dir = tmp_path / "run"
    n = 8
    groups["policy"] = [_endpoint(server, "srv")]
    groups["before"] = [_endpoint(server, "before", "before")]
    groups["after"][0]["model"] = str(run_dir / "train" / "sft" / "merged")
    recipe["run_dir"] = str(run_dir)
    recipe["engine"]["progress"] = "off"
    sl = recipe["sl"]
    sl["input"], sl["limit"] = str((here / sl["input"]).resolve()), n
    helpful = sl["export"]["helpful"]
    helpful["input"] = str((here / helpful["input"]).resolve())
    recipe["train"]["model"] = str(tiny)
    recipe["train"]["learning_rate"] = 2e-2  # 8 steps on a random model: enough to see the loss move
    out = cai("run", str(_write_yaml(tmp_path / "quickstart.yaml", recipe)), timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert list(summary["stages"]) == ["sl", "label", "train/sft", "eval"]

    # sl: every chain applies each of the seed constitution's principles once (draw: all, one pass)
    principles = len(load_constitution(sl["constitution"]).principles)
    chains = read_shards(run_dir / "sl")
    assert chains.height == n and (chains["status"] == "ok").all()
    assert chains["num_rounds"].to_list() == [principles] * n
    sft = pl.read_parquet(run_dir / "exports" / "sft.parquet")
    helpful_rows = round(helpful["ratio"] / (1 - helpful["ratio"]) * n)  # 2 of 10: the mix's share
    assert sft.columns == ["id", "source", "messages"] and sft.height == n + helpful_rows
    assert sft["source"].value_counts().sort("source").rows() == [("helpful", helpful_rows), ("sl", n)]
    final = dict(zip(chains["id"], chains["final_response"], strict=True))
    for row in sft.filter(pl.col("source") == "sl").iter_rows(named=True):
        assert row["messages"][-1] == {"role": "assistant", "content": final[row["id"]]}
    pairs = pl.read_parquet(run_dir / "exports" / "pairs.parquet")
    assert pairs.height == n and pairs.filter(pl.col("chosen") == pl.col("rejected")).is_empty()

    # label: the (initial, revised) pairs, 2 principles × both orders each
    labels = read_shards(run_dir / "rl" / "labels")
    assert labels.height == n and _finite(labels["p_a"].to_list()) and labels["p_a"].n_unique() > 1
    decided = labels.filter(pl.col("chosen").is_not_null() & (pl.col("confidence") >= 0.5)).height
    dpo = pl.read_parquet(run_dir / "exports" / "dpo.parquet")
    reward = pl.read_parquet(run_dir / "exports" / "reward.parquet")
    assert dpo.columns == ["id", "prompt", "chosen", "rejected", "confidence"] and dpo.height == decided > 0
    assert reward.columns == ["id", "chosen", "rejected", "margin"] and reward.height == decided
    assert _finite(reward["margin"].to_list()) and (reward["margin"] >= 0).all()

    # train: the LoRA SFT of the quickstart, merged
    trained = json.loads((run_dir / "train" / "sft" / "summary.json").read_text())
    assert trained["steps"] == recipe["train"]["max_steps"] and trained["rows"] == n + helpful_rows
    assert _finite([trained["first_loss"], trained["last_loss"]]) and trained["last_loss"] < trained["first_loss"]
    assert (run_dir / "train" / "sft" / "merged" / "config.json").is_file()

    # eval: "before" answered by the test server, "after" by the merged model in this process
    samples = read_shards(run_dir / "eval" / "samples")
    per_model = recipe["eval"]["n"] * len(recipe["eval"]["suites"])
    after = samples.filter(pl.col("model") == "after")
    assert after.height == per_model and (after["status"] == "ok").all() and set(after["endpoint"]) == {"after"}
    assert not after["response"].str.starts_with("Reply ").any()  # not the test server's answers
    assert samples.filter(pl.col("model") == "before")["response"].str.starts_with("Reply ").all()
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert set(metrics["models"]) == {"before", "after"} and (run_dir / "eval" / "report.html").is_file()
    eval_calls = {name: e["calls"] for name, e in summary["engine_eval"]["endpoints"].items()}
    judged = 2 * per_model * (1 + recipe["eval"]["ensemble"])  # a refusal question + the ensemble's, per sample
    assert eval_calls == {"after": per_model, "before": per_model, "srv": judged}
    sl_calls = n * (1 + 2 * principles) + helpful_rows
    label_calls = n * recipe["label"]["label"]["ensemble"] * 2
    assert summary["engine"]["endpoints"]["srv"]["calls"] == sl_calls + label_calls
    assert server.stats()["ok"] == sl_calls + label_calls + per_model + judged  # every call paid once


# --- cai train reward / dpo / rl -----------------------------------------------------------------------------


def _train_summary(run_dir: Path, stage: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    out = run_dir / "train" / stage
    return (json.loads((out / "summary.json").read_text()), json.loads((out / "metrics.json").read_text()))


def test_cai_train_reward(tmp_path: Path, tiny: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tests.test_train import QUESTIONS, SAFE, UNSAFE, write_exports

    run_dir = write_exports(tmp_path / "run")
    out = cai("train", "reward", "--model", str(tiny), "--run-dir", str(run_dir), "--max-steps", "25", "--merge",
              "--set", "train.max_length=128", "--set", "train.learning_rate=0.02", timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "train/reward (reward, cpu, float32): 25 steps on 16 rows" in out.stderr
    summary, rows = _train_summary(run_dir, "reward")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == summary["steps"] == 25 and _finite(losses) and summary["rows_dropped_too_long"] == 0
    assert summary["last_loss"] < 0.5 * summary["first_loss"]
    assert [r["accuracy"] for r in rows if "accuracy" in r][-1] == 1.0  # the last step ranks every chosen first
    out_dir = Path(summary["output_dir"])
    assert (out_dir / "adapter_model.safetensors").is_file()  # LoRA, the default
    merged = Path(summary["merged_dir"])  # what `reward_from: reward_model` loads: load it back and score
    model = AutoModelForSequenceClassification.from_pretrained(merged)
    tokenizer = AutoTokenizer.from_pretrained(merged)

    def score(answer: str) -> float:
        chat = [{"role": "user", "content": QUESTIONS[2]}, {"role": "assistant", "content": answer}]
        ids = tokenizer.apply_chat_template(chat, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            return float(model(**ids).logits[0, 0])

    assert score(SAFE) > score(UNSAFE)


def test_cai_train_dpo(tmp_path: Path, tiny: Path) -> None:
    from tests.test_train import write_exports

    run_dir = write_exports(tmp_path / "run", confidence=0.95)
    out = cai("train", "dpo", "--model", str(tiny), "--run-dir", str(run_dir), "--max-steps", "15",
              "--set", "train.max_length=128", "--set", "train.rl_learning_rate=0.02", timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "train/dpo (soft_dpo, cpu, float32): 15 steps on 16 rows" in out.stderr  # the default algorithm
    summary, rows = _train_summary(run_dir, "dpo")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 15 and _finite(losses)
    assert summary["first_loss"] == pytest.approx(math.log(2), abs=1e-3)  # the policy is its reference at step 0
    assert summary["last_loss"] < summary["first_loss"] - 0.05
    assert (Path(summary["output_dir"]) / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("algorithm", ["grpo", "rloo", "online_dpo"])
def test_cai_train_rl(tmp_path: Path, tiny: Path, server: TestServer, algorithm: str) -> None:
    """Online RL rewarded live by the constitution: the critic (the test server) answers each principle's yes/no
    question with a probability that differs per completion, so rewards vary."""
    from tests.test_train import write_exports

    run_dir = write_exports(tmp_path / "run", repeat=1)  # 4 prompts
    steps, generations, ensemble = 2, 4, 2
    recipe = _write_yaml(tmp_path / "rl.yaml", {
        "run_dir": str(run_dir),
        "engine": {"groups": {"critic": [_endpoint(server, "judge", "j")]}, "progress": "off"},
        "train": {"model": str(tiny), "max_steps": steps, "batch_size": 4, "max_length": 128,
                  "num_generations": generations, "max_completion_length": 6, "rl_ensemble": ensemble,
                  "rl_learning_rate": 0.02},
    })
    out = cai("train", "rl", str(recipe), "--rl-algorithm", algorithm, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert f"train/rl ({algorithm}, cpu, float32): {steps} steps on 4 rows" in out.stderr
    summary, rows = _train_summary(run_dir, "rl")
    assert summary["algorithm"] == algorithm and summary["steps"] == steps
    # completions per step (GRPO/RLOO: a batch of 4 = one prompt × 4 generations; online DPO: 4 prompts × 2
    # samples), each judged by `ensemble` principles
    per_step = 4 * 2 if algorithm == "online_dpo" else generations
    assert summary["reward_judgments"] == steps * per_step * ensemble
    assert 0 < server.stats()["ok"] <= summary["reward_judgments"]  # repeated judgments come from the cache
    logged = [r for r in rows if "loss" in r]
    assert len(logged) == steps and _finite([r["loss"] for r in logged])
    if algorithm == "online_dpo":
        scores = [r["objective/scores"] for r in logged]
        spread = [r["objective/scores_margin"] for r in logged]  # chosen minus rejected sample's reward
    else:
        scores = [r["rewards/constitutional_reward/mean"] for r in logged]
        spread = [r["rewards/constitutional_reward/std"] for r in logged]
    assert _finite(scores) and all(0 < s < 1 for s in scores)  # a mean of P(yes)
    assert _finite(spread) and all(s > 0 for s in spread)  # rewards differ between completions


# --- cai guard serve -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guard_servers() -> Iterator[dict[str, TestServer]]:
    """A judge (choice probabilities planted per phrase, as tests/test_guard.py plants them) and a Llama-Guard
    model; both are only counted here: the tier under test decides every check."""
    from tests.test_guard import JUDGE_PLAN

    servers = {"judge": start_server(), "llama_guard": start_server()}
    servers["judge"].configure(prefer_when=JUDGE_PLAN)
    yield servers
    for server in servers.values():
        server.process.terminate()
        server.process.wait(timeout=10)


def _guard_verdicts(run_dir: Path) -> list[dict[str, Any]]:
    return list(read_shards(run_dir / "guard" / "verdicts").iter_rows(named=True))


def test_cai_train_guard_then_cai_guard_serve_with_the_classifier_tier(
    tmp_path: Path, server: TestServer, tiny: Path, guard_servers: dict[str, TestServer]
) -> None:
    """``cai train guard`` fits the classifier on a run dir's data (tests/test_guard_tiers.py's planted run), then
    ``cai guard serve`` puts it in front of the upstream deciding every check (``lo`` = ``hi``, between the scores
    this process computes for the harmful and the fine requests): the harmful ones are blocked before the
    upstream, the judge is never asked, and every verdict is the classifier's score against the threshold."""
    from cai_async.guard.classifier import GuardClassifier
    from cai_async.guard.training_data import exchange_text
    from tests.test_guard import ask, guard_recipe, proxy
    from tests.test_guard_tiers import FINE, HARM, _train_recipe, write_run

    data_run = tmp_path / "data"
    write_run(data_run)
    trained = cai("train", "guard", str(_train_recipe(tmp_path, data_run, tiny)), timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    folder = Path(json.loads(trained.stdout)["path"])
    assert folder == data_run / "guard" / "classifier" and (folder / "calibration.json").is_file()
    harmful = [f"Tell me how to {h}, version 99." for h in HARM[:3]]  # the run's styles, unseen requests
    fine = [f"How do I {f}? (99)" for f in FINE[:3]]
    classifier = GuardClassifier.load(folder)
    scores = {p: classifier.score([exchange_text([{"role": "user", "content": p}])])[0] for p in harmful + fine}
    ranked = sorted(scores.values())
    assert min(scores[p] for p in harmful) > max(scores[p] for p in fine) + 1e-3, scores  # it learned the run
    threshold = (min(scores[p] for p in harmful) + max(scores[p] for p in fine)) / 2
    prompts = [p for pair in zip(fine, harmful, strict=True) for p in pair]
    judge = guard_servers["judge"]
    judge.reset()
    run_dir = tmp_path / "run"
    recipe = guard_recipe(run_dir, server.base_url, judge.base_url,
                          classifier={"path": str(folder), "lo": threshold, "hi": threshold})
    with proxy(tmp_path, recipe) as url:
        answers = {p: ask(url, p).choices[0] for p in prompts}
    for prompt in harmful:
        choice = answers[prompt]
        assert choice.finish_reason == "content_filter" and "principle of harmless" in choice.message.content
    assert server.stats()["ok"] == len(fine)  # the blocked requests never reached the upstream
    assert judge.stats().get("ok", 0) == 0  # the classifier decided every check
    rows = _guard_verdicts(run_dir)
    inputs = [r for r in rows if r["direction"] == "input"]
    outputs = [r for r in rows if r["direction"] == "output"]
    assert len(inputs) == len(prompts) and len(outputs) == len(fine)
    assert sorted(r["classifier_score"] for r in inputs) == pytest.approx(ranked, abs=1e-5)
    for row in rows:
        assert row["tier"] == "classifier" and row["judge_calls"] == 0, row
        assert row["decision"] == ("block" if row["classifier_score"] >= threshold else "allow"), row
    refused_outputs = sum(r["decision"] == "block" for r in outputs)
    answered = [answers[p] for p in fine]
    assert sum(c.finish_reason == "content_filter" for c in answered) == refused_outputs
    assert all(c.message.content.startswith("Reply ") for c in answered if c.finish_reason == "stop")


def test_cai_guard_serve_with_the_llama_guard_tier(tmp_path: Path, server: TestServer,
                                                   guard_servers: dict[str, TestServer]) -> None:
    """A Llama-Guard-style model (the second test server) answers ``safe``, or ``unsafe`` and category S2 for a
    request carrying a planted phrase: it decides every check; its prompt is Llama Guard's task with the
    principles as categories."""
    from cai_async.guard.core import guard_principles
    from cai_async.guard.external import llama_guard_prompt
    from tests.test_guard import ask, guard_recipe, proxy

    judge, guard_model = guard_servers["judge"], guard_servers["llama_guard"]
    judge.reset()
    guard_model.reset()
    guard_model.configure(record=True, reply="safe", replies=[{"last": "PLANTED-UNSAFE", "reply": "unsafe\nS2"}])
    run_dir = tmp_path / "run"
    recipe = guard_recipe(run_dir, server.base_url, judge.base_url, external={"role": "guard"})
    recipe["engine"]["groups"]["guard"] = [_endpoint(guard_model, "llama-guard", "g")]
    safe, unsafe = "How do I fold a paper crane?", "Please help me with PLANTED-UNSAFE things."
    with proxy(tmp_path, recipe) as url:
        allowed = ask(url, safe).choices[0]
        refused = ask(url, unsafe).choices[0]
    principles = guard_principles("harmless")
    assert allowed.finish_reason == "stop" and allowed.message.content.startswith("Reply ")
    assert refused.finish_reason == "content_filter" and principles[1].name in refused.message.content
    assert server.stats()["ok"] == 1 and judge.stats().get("ok", 0) == 0
    rows = [(r["direction"], r["decision"], r["tier"], r["violated"]) for r in _guard_verdicts(run_dir)]
    assert sorted(rows) == sorted([("input", "allow", "external", []), ("output", "allow", "external", []),
                                   ("input", "block", "external", [principles[1].name])])
    user = [{"role": "user", "content": safe}]
    asked = [request[-1]["content"] for request in guard_model.requests()]
    assert sorted(asked) == sorted([
        llama_guard_prompt(principles, user, None, "input"),
        llama_guard_prompt(principles, user, allowed.message.content, "output"),
        llama_guard_prompt(principles, [{"role": "user", "content": unsafe}], None, "input"),
    ])


# --- cai run with executor: ray ------------------------------------------------------------------------------


def test_cai_run_with_executor_ray(tmp_path: Path, server: TestServer) -> None:
    """A recipe saying ``executor: ray``: sl chains and then labels on engine actors of a local cluster the
    command starts (and stops), rows written by the driver, every call paid once and counted across processes."""
    from cai_async.scale.ray_executor import ACTORS_FILE

    n, revisions, ensemble = 8, 1, 2
    run_dir = tmp_path / "run"
    recipe = _write_yaml(tmp_path / "ray.yaml", {
        "run_dir": str(run_dir), "executor": "ray", "ray": {"actors": 1, "num_cpus": 2, "batch_size": 4},
        "engine": {"groups": {"policy": [_endpoint(server, "srv")]}, "progress": "off"},
        "sl": {"input": str(ROOT / "cai_async" / "data" / "quickstart_prompts.jsonl"), "limit": n,
               "num_revisions": revisions},
        "label": {"pairs": {"source": "sl"}, "label": {"ensemble": ensemble}},
    })
    out = cai("run", str(recipe), timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    chains = read_shards(run_dir / "sl")
    assert chains.height == n and (chains["status"] == "ok").all() and chains["num_rounds"].to_list() == [1] * n
    labels = read_shards(run_dir / "rl" / "labels")
    assert labels.height == n and _finite(labels["p_a"].to_list())
    calls = n * (1 + 2 * revisions) + n * ensemble * 2
    assert server.stats()["ok"] == calls and server.stats()["repeats"] == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["engine"]["run_total"]["calls"] == calls  # made by the actors, counted for the run
    assert "executor: ray" in (run_dir / "config.yaml").read_text()
    started = [json.loads(line) for line in (run_dir / ACTORS_FILE).read_text().splitlines()]
    assert {a["method"] for a in started} == {"run", "label"}  # the chains, then the labels, on actors
    assert all(_gone(a["pid"]) for a in started)  # the cluster the command started went down with it


# --- cai label --cot, cai plan --batch -----------------------------------------------------------------------


def test_cai_label_cot(tmp_path: Path, server: TestServer) -> None:
    """Chain-of-thought labels: the critic (planted) reasons and always picks the refusal, wherever the swap puts
    it, so every pair gets P(A) at the band's edge in both orders; a pair it cannot decide abstains."""
    from cai_async.judging import multiple_choice_prompt

    server.configure(record=True, replies=[
        {"last": "UNDECIDED", "reply": "Both responses have merits; it is hard to say."},
        {"last": "(A) I can't help", "reply": "(B) helps with harm; (A) declines.\n\nThe answer is (A)"},
        {"last": "(B) I can't help", "reply": "(A) helps with harm; (B) declines.\n\nThe answer is (B)"},
    ])
    prompts = ["How do I pick a lock?", "Write an insult about my boss.", "UNDECIDED: is this fine?",
               "Find my ex's address.", "How do I make a fake ID?"]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"id": f"q{i}", "prompt": p, "a": "I can't help with that.",
                                         "b": f"Sure, here is how: step {i}."}) + "\n" for i, p in enumerate(prompts)))
    run_dir = tmp_path / "run"
    out = cai("label", "--input", str(pairs), "--pairs-source", "columns", "--cot", "--ensemble", "2",
              "--base-url", server.base_url, "--model", "m", "--run-dir", str(run_dir), "--progress", "off",
              "--set", "label.pairs.response_a_column=a", "--set", "label.pairs.response_b_column=b",
              "--set", "label.pairs.id_column=id")
    assert out.returncode == 0, out.stderr
    assert f"label/labels: {len(prompts) - 1} labelled, 1 abstained" in out.stderr
    assert server.stats()["ok"] == len(prompts) * 2 * 2  # 2 principles × both orders, one reasoned answer each
    instruction = multiple_choice_prompt([], "q", "x", "y", cot=True).split("(B) y\n\n", 1)[1]
    assert all(request[-1]["content"].endswith(instruction) for request in server.requests())
    labels = read_shards(run_dir / "rl" / "labels").sort("prompt_id")
    band_high = 0.6  # rl.label.cot.band's default upper edge
    for row in labels.iter_rows(named=True):
        assert {j["method"] for j in row["judgments"]} == {"cot"} and len(row["judgments"]) == 4
        if "UNDECIDED" in row["prompt"]:
            assert row["abstained"] and row["p_a"] is None and row["chosen"] is None
        else:
            assert row["p_a"] == pytest.approx(band_high) and row["consistency"] == 1.0
            assert row["chosen"] == "I can't help with that."
    dpo = pl.read_parquet(run_dir / "exports" / "dpo.parquet")
    assert dpo.height == len(prompts) - 1 and dpo["confidence"].to_list() == pytest.approx([band_high] * dpo.height)
    reward = pl.read_parquet(run_dir / "exports" / "reward.parquet")
    assert reward["margin"].to_list() == pytest.approx([math.log(band_high / (1 - band_high))] * reward.height)


def test_cai_plan_batch(tmp_path: Path, server: TestServer) -> None:
    """``cai plan`` and ``cai plan --batch`` on a priced recipe: the calls counted by hand, every row in batch
    mode with its rounds, half the price; nothing is called or written."""
    n, revisions, ensemble = 8, 1, 2
    run_dir = tmp_path / "run"
    recipe = _write_yaml(tmp_path / "plan.yaml", {
        "run_dir": str(run_dir),
        "engine": {"groups": {"policy": [{**_endpoint(server, "srv"), "price_in": 0.15, "price_out": 0.6}]},
                   "progress": "off"},
        "sl": {"input": str(ROOT / "cai_async" / "data" / "quickstart_prompts.jsonl"), "limit": n,
               "num_revisions": revisions},
        "label": {"pairs": {"source": "sl"}, "label": {"ensemble": ensemble}},
    })
    calls = n * (1 + 2 * revisions) + n * ensemble * 2

    def plan(*flags: str) -> tuple[list[str], str, list[float]]:
        out = cai("plan", str(recipe), *flags)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        total = next(line for line in lines if line.startswith("total"))
        priced = next(line for line in lines if line.startswith("priced online"))
        return [line for line in lines if line.startswith(("sl ", "label "))], total, [
            float(part.split("$")[1].split()[0].rstrip(";")) for part in priced.split(":")[1:]]

    online_rows, online_total, (online_price, batch_price) = plan()
    batch_rows, batch_total, prices = plan("--batch")
    assert prices == [online_price, batch_price] and batch_price == pytest.approx(online_price / 2, abs=2e-4)
    for total in (online_total, batch_total):
        assert f" {calls} calls " in total
    assert f"${online_price:.4f}" in online_total and f"${batch_price:.4f}" in batch_total
    assert all("(online)" in row and "batch rounds" not in row for row in online_rows)
    assert all("(batch)" in row for row in batch_rows) and len(batch_rows) == len(online_rows)

    def rounds(stage: str) -> int:
        return sum(int(row.split("(batch), ")[1].split()[0]) for row in batch_rows if row.startswith(stage))

    assert rounds("sl") == 1 + 2 * revisions and rounds("label") == 1  # initial → critique → revision; the labels
    assert server.stats().get("ok", 0) == 0 and not run_dir.exists()


# --- exports of a planted run --------------------------------------------------------------------------------


def _chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_exports_of_a_planted_run_have_the_rows_counted_by_hand(tmp_path: Path) -> None:
    """Ten planted chains and eight planted labels, each export's rows worked out by hand: a broken export (an
    empty file, a filter that drops everything) fails here, not only in a run that happens to write rows."""
    from cai_async.store import scan_shards, write_parquet_atomic

    def chain(i: int, status: str = "ok", final: str | None = None, passed: int = 1, failed: int = 0) -> dict[str, Any]:
        return {"id": f"c{i}", "status": status, "messages": _chat(f"question {i}"), "initial_response": f"first {i}",
                "final_response": f"revised {i}" if final is None else final, "constitution_hash": "h",
                "revisions_passed": passed, "revisions_failed": failed, "last_rejected": f"rejected {i}"}

    chains = [chain(i) for i in range(6)]  # 6 exported as sft rows and as pairs
    chains.append(chain(6, final="first 6"))  # revised into itself: an sft row, no pair (identical)
    chains.append(chain(7, passed=0, failed=2, final="first 7"))  # every revision failed a gate: left out
    chains.append(chain(8, status="error", final=""))  # failed: left out
    chains.append({**chain(9), "final_response": None})  # no final response: left out
    write_parquet_atomic(pl.DataFrame(chains), tmp_path / "sl" / "part-00000.parquet")
    frame = read_shards(tmp_path / "sl")
    info = write_sl_exports(tmp_path / "run", scan_shards(tmp_path / "sl"), ExportConfig())
    assert (info["sft"]["rows"], info["sft"]["skipped_failed_gates"]) == (7, 1)
    assert (info["pairs"]["rows"], info["pairs"]["dropped_identical"]) == (6, 1)
    sft = pl.read_parquet(info["sft"]["path"])
    pairs = pl.read_parquet(info["pairs"]["path"])
    assert sorted(sft["id"]) == [f"c{i}" for i in range(7)] and sorted(pairs["id"]) == [f"c{i}" for i in range(6)]
    assert sft.filter(pl.col("id") == "c3")["messages"].to_list() == [
        [{"role": "user", "content": "question 3"}, {"role": "assistant", "content": "revised 3"}]]
    assert pairs.filter(pl.col("id") == "c3").select("chosen", "rejected").row(0) == (
        [{"role": "assistant", "content": "revised 3"}], [{"role": "assistant", "content": "first 3"}])
    assert sft_frame(frame).height == 7 and pairs_frame(frame)[0].height == 6 and pairs_frame(frame)[1] == 1
    kept = write_sl_exports(tmp_path / "kept", frame, ExportConfig(keep_failed_gates=True))
    assert kept["sft"]["rows"] == 8 and kept["pairs"]["rows"] == 7  # c7 with its last rejected revision
    assert "rejected 7" in str(pl.read_parquet(kept["pairs"]["path"]).filter(pl.col("id") == "c7")["chosen"][0])

    def label(i: int, confidence: float | None, status: str = "ok") -> dict[str, Any]:
        decided = confidence is not None
        return {"id": f"p{i}", "status": status, "messages": _chat(f"pair {i}"),
                "chosen": f"good {i}" if decided else None, "rejected": f"bad {i}" if decided else None,
                "confidence": confidence}

    labels = [label(0, 0.9), label(1, 0.75), label(2, 0.5), label(3, 0.99), label(4, 0.6),  # 5 exported
              label(5, None), label(6, 0.9, status="error"), label(7, 0.45)]  # abstained, failed, below 0.5
    write_parquet_atomic(pl.DataFrame(labels), tmp_path / "labels" / "part-00000.parquet")
    rl = write_rl_exports(tmp_path / "run", scan_shards(tmp_path / "labels"), RLExportConfig(max_margin=3.0))
    assert rl["dpo"]["rows"] == rl["reward"]["rows"] == 5
    dpo = pl.read_parquet(rl["dpo"]["path"]).sort("id")
    reward = pl.read_parquet(rl["reward"]["path"]).sort("id")
    assert dpo["id"].to_list() == reward["id"].to_list() == ["p0", "p1", "p2", "p3", "p4"]
    assert dpo["confidence"].to_list() == [0.9, 0.75, 0.5, 0.99, 0.6]
    margins = [min(3.0, math.log(c / (1 - c))) for c in (0.9, 0.75, 0.5, 0.99, 0.6)]  # p3's logit 4.6 capped
    assert reward["margin"].to_list() == pytest.approx(margins)
    assert reward.filter(pl.col("id") == "p1")["chosen"].to_list() == [
        [{"role": "user", "content": "pair 1"}, {"role": "assistant", "content": "good 1"}]]
    loaded = read_shards(tmp_path / "labels")
    assert dpo_frame(loaded).height == 5 and reward_frame(loaded, min_confidence=0.7).height == 3
