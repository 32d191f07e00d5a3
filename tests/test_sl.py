"""SL-CAI chains against the OpenAI-compatible test server: structure, chat formatting, early stop, cleaning
flags, recorded errors, resume without paying twice, kill -9, exports that TRL accepts, ``cai show``."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import anyio
import polars as pl
import pytest

from cai_async import Recipe, load_constitution, read_shards, run_recipe
from tests.conftest import PUBLIC_DATA, TestServer, kill_repeatedly
from tests.test_cli import CAI, cai

HH_PROMPTS = PUBLIC_DATA / "hh_rlhf" / "harmless_base_test_first_human_turns.jsonl"
PUBLIC = PUBLIC_DATA / "llm_swarm" / "constitution_anthropic.json"


def recipe(server: TestServer, run_dir: Path, **sl: Any) -> Recipe:
    return Recipe.model_validate({
        "run_dir": str(run_dir),
        "engine": {
            "groups": {"policy": [{"name": "srv", "backend": "openai", "model": "m", "base_url": server.base_url}]},
            "progress": "off",
            "retry": {"max_attempts": 2, "initial_s": 0.01, "max_wait_s": 0.05},
        },
        "sl": {"input": str(HH_PROMPTS), "id_column": "id", "limit": 12, "num_revisions": 2, **sl},
    })


def run(server: TestServer, run_dir: Path, **sl: Any) -> dict[str, Any]:
    summary: dict[str, Any] = anyio.run(run_recipe, recipe(server, run_dir, **sl))
    return summary


def test_chains_have_every_step_and_distinct_principles(tmp_path: Path, server: TestServer) -> None:
    summary = run(server, tmp_path / "run", constitution=str(PUBLIC))
    assert summary["stages"]["sl"]["ok"] == 12
    assert server.stats()["ok"] == 12 * 5  # initial + 2 × (critique + revision)
    chains = read_shards(tmp_path / "run" / "sl")
    constitution = load_constitution(PUBLIC)
    assert set(chains["constitution_hash"]) == {constitution.content_hash}
    expected_prompts = {str(r["id"]): r["prompt"] for r in pl.read_ndjson(HH_PROMPTS).head(12).iter_rows(named=True)}
    for row in chains.iter_rows(named=True):
        assert row["prompt"] == expected_prompts[row["id"]]
        rounds = row["rounds"]
        assert [r["round"] for r in rounds] == [1, 2]
        assert rounds[0]["principle"] != rounds[1]["principle"]
        assert rounds[0]["critique_request"] == constitution.principle(rounds[0]["principle"]).critique
        assert all(r["critique"].startswith("Reply ") and r["revision"].startswith("Reply ") for r in rounds)
        assert row["final_response"] == rounds[-1]["revision"]
        assert row["initial_endpoint"] == "srv" and rounds[1]["revision_model"] == "m"
        assert row["prompt_tokens"] == row["initial_prompt_tokens"] + sum(
            r["critique_prompt_tokens"] + r["revision_prompt_tokens"] for r in rounds
        )
    # the draw is seeded per prompt: principles vary across chains
    assert chains.select(pl.col("rounds").list.first().struct.field("principle")).n_unique() > 3


def test_requests_are_chat_formatted_with_few_shot_turns(tmp_path: Path, server: TestServer) -> None:
    server.configure(record=True)
    run(server, tmp_path / "run", constitution=str(PUBLIC), few_shot=1, limit=1, num_revisions=1,
        system_prompt="Be kind.")
    initial, critique, revision = server.requests()
    example = load_constitution(PUBLIC).few_shot[0].messages()
    prompt = pl.read_ndjson(HH_PROMPTS).row(0, named=True)["prompt"]
    assert initial == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": prompt}]
    assert critique[0]["role"] == "system" and critique[1:7] == example  # few-shot as prior turns
    assert critique[7] == {"role": "user", "content": prompt}
    assert critique[8]["role"] == "assistant" and critique[8]["content"].startswith("Reply ")
    assert critique[9]["role"] == "user" and len(critique) == 10
    assert revision[:10] == critique  # the revision extends the critique's context (KV-cache friendly)
    assert revision[10]["role"] == "assistant" and revision[11]["role"] == "user" and len(revision) == 12


def test_early_stop_is_configurable_and_recorded(tmp_path: Path, server: TestServer) -> None:
    run(server, tmp_path / "run", early_stop={"enabled": True, "pattern": r"^Reply [0-9a-f]{8} to: Identify"},
        constitution=str(PUBLIC), limit=30, num_revisions=3)
    chains = read_shards(tmp_path / "run" / "sl")
    stopped = chains.filter(pl.col("stopped_early"))
    assert 0 < stopped.height < chains.height  # only critiques of principles starting "Identify" match
    for row in stopped.iter_rows(named=True):
        last = row["rounds"][-1]
        assert last["early_stop"] and last["revision"] is None and last["critique_request"].startswith("Identify")
        assert row["early_stop_rule"] == r"^Reply [0-9a-f]{8} to: Identify"
        assert row["final_response"] == (row["rounds"][-2]["revision"] if len(row["rounds"]) > 1
                                         else row["initial_response"])
    calls = sum(1 + 2 * r["num_rounds"] - r["stopped_early"] for r in chains.iter_rows(named=True))
    assert server.stats()["ok"] == calls


def test_given_responses_skip_the_initial_call(tmp_path: Path, server: TestServer) -> None:
    hh = PUBLIC_DATA / "hh_rlhf" / "harmless-base" / "test.jsonl.gz"
    run(server, tmp_path / "run", input=str(hh), prompt_column="rejected", id_column=None,
        last_assistant_turn="as_response", limit=5, num_revisions=1)
    chains = read_shards(tmp_path / "run" / "sl")
    assert chains.height == 5 and set(chains["initial_source"]) == {"given"}
    assert server.stats()["ok"] == 5 * 2
    assert (chains["messages"].list.len() >= 1).all()


def test_step_errors_are_recorded_and_the_run_goes_on(tmp_path: Path, server: TestServer) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        '{"prompt": "fine one"}\n{"prompt": "quiet @@empty@@"}\n{"prompt": "refused @@status:400@@"}\n'
        '{"prompt": "flaky @@status:503@@"}\n{"prompt": "fine two"}\n'
    )
    bad = tmp_path / "c.yaml"
    bad.write_text("name: c\nprinciples:\n  - {name: a, critique: 'Critique it.', revision: 'Fix it. @@empty@@'}\n")
    summary = run(server, tmp_path / "run", input=str(prompts), id_column=None, constitution=str(bad),
                  num_revisions=1)
    stage = summary["stages"]["sl"]
    assert (stage["ok"], stage["errors"], stage["failed"]) == (0, 4, 1)
    chains = read_shards(tmp_path / "run" / "sl")
    steps = dict(zip(chains["prompt"], chains["error_step"], strict=True))
    assert steps == {"fine one": "revision", "fine two": "revision", "quiet @@empty@@": "initial",
                     "refused @@status:400@@": "initial"}
    fine = chains.filter(pl.col("prompt") == "fine one").row(0, named=True)
    assert "answered the revision step with empty text" in fine["error"]
    assert fine["rounds"][0]["critique"].startswith("Reply ")  # finished steps are kept
    assert "flaky" not in " ".join(chains["prompt"])  # transient: not recorded, so a rerun retries it
    before = server.stats()["requests"]
    again = run(server, tmp_path / "run", input=str(prompts), id_column=None, constitution=str(bad),
                num_revisions=1)["stages"]["sl"]
    # the 400 is kept; empty answers are endpoint-side, so they are retried (from the cache: free, unless the
    # endpoint or model changed) and recorded again; the transient chain is tried again
    assert (again["skipped_already_done"], again["errors_kept"], again["errors"], again["failed"]) == (1, 1, 3, 1)
    # only the transient chain reached the server: 2 attempts, each sent once more at once after its 503
    assert server.stats()["requests"] - before == 4


def test_resume_pays_for_nothing_twice(tmp_path: Path, server: TestServer) -> None:
    run(server, tmp_path / "run", limit=6)
    first = server.stats()["ok"]
    summary = run(server, tmp_path / "run", limit=12)
    assert summary["stages"]["sl"]["skipped_already_done"] == 6
    assert server.stats()["ok"] == first + 6 * 5
    assert server.stats()["repeats"] == 0
    # a lost shard (chains cut off half-way) comes back from the cache without a call
    for shard in (tmp_path / "run" / "sl").glob("part-*.parquet"):
        shard.unlink()
    summary = run(server, tmp_path / "run", limit=12)
    assert summary["stages"]["sl"]["written"] == 12 and server.stats()["ok"] == first + 30
    assert summary["engine"]["cache_hits"] == 60


def test_exports_load_into_datasets_and_trl(tmp_path: Path, server: TestServer) -> None:
    import datasets
    from trl.data_utils import is_conversational, maybe_apply_chat_template

    helpful = PUBLIC_DATA / "self_instruct" / "seed_tasks.jsonl"
    summary = run(server, tmp_path / "run", export={"helpful": {"input": str(helpful),
                                                              "prompt_column": "instruction", "ratio": 0.25}})
    exports = summary["stages"]["sl"]["exports"]
    assert exports["sft"]["sl_rows"] == 12 and exports["sft"]["helpful_rows"] == 4
    assert server.stats()["ok"] == 12 * 5 + 4  # only the helpful answers the mix needs are generated
    sft = datasets.load_dataset("parquet", data_files=exports["sft"]["path"], split="train")
    pairs = datasets.load_dataset("parquet", data_files=exports["pairs"]["path"], split="train")
    assert len(sft) == 16 and len(pairs) == 12
    assert is_conversational(sft[0]) and is_conversational(pairs[0])
    assert all(row["messages"][-1]["role"] == "assistant" for row in sft)
    chains = read_shards(tmp_path / "run" / "sl")
    by_id = {r["id"]: r for r in chains.iter_rows(named=True)}
    for row in pairs:
        chain = by_id[row["id"]]
        assert row["chosen"] == [{"role": "assistant", "content": chain["final_response"]}]
        assert row["rejected"] == [{"role": "assistant", "content": chain["initial_response"]}]
        assert row["prompt"] == chain["messages"]

    class Template:  # stands in for a tokenizer's chat template; TRL only calls apply_chat_template
        def apply_chat_template(self, messages: list[dict[str, str]], **kwargs: Any) -> str:
            return "".join(f"<{m['role']}>{m['content']}" for m in messages)

    rendered = maybe_apply_chat_template(pairs[0], Template())  # type: ignore[arg-type]
    assert rendered["chosen"].startswith("<assistant>")
    assert set(sft["source"]) == {"sl", "helpful"}


def test_show_prints_counts_failures_and_chains(tmp_path: Path, server: TestServer) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "fine"}\n{"prompt": "broken @@status:400@@"}\n')
    run(server, tmp_path / "run", input=str(prompts), id_column=None)
    out = cai("show", str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr
    assert "ok: 1" in out.stdout and "errors: 1" in out.stdout
    assert "initial: PermanentError" in out.stdout  # grouped failure reason
    assert "USER: fine" in out.stdout and "round 2 · principle" in out.stdout
    errors = cai("show", str(tmp_path / "run"), "--errors")
    assert "ERROR at initial" in errors.stdout


def test_cli_sl_flags_override_the_recipe(tmp_path: Path, server: TestServer) -> None:
    out = cai("sl", "--input", str(HH_PROMPTS), "--limit", "3", "--base-url", server.base_url, "--model", "m",
              "--constitution", "seed", "--num-revisions", "1", "--run-dir", str(tmp_path / "run"),
              "--progress", "off", "--set", "sl.id_column=id")
    assert out.returncode == 0, out.stderr
    assert "sl: 3 written" in out.stderr and "principle harmlessness" in out.stderr
    assert "exports/sft.parquet (3 rows)" in out.stderr
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "constitution: seed" in config and "num_revisions: 1" in config


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["--constitution", "EMPTY"], "a constitution needs at least one principle"),
        (["--constitution", "nope"], "no such constitution file or built-in"),
        (["--set", "sl.prompt_column=question"], "no prompt column 'question'"),
        (["--set", "sl.num_revisions=0"], "sl.num_revisions: Input should be greater than or equal to 1"),
        (["--set", "sl.principle_weights={kindness: 2}"], "principle_weights: no principle 'kindness'"),
        (["--set", "sl.early_stop.pattern=("], "sl.early_stop.pattern: Value error, not a valid regular"),
    ],
)
def test_bad_sl_input_is_one_clear_line(tmp_path: Path, server: TestServer, args: list[str], pattern: str) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("name: empty\nprinciples: []\n")
    args = [str(empty) if a == "EMPTY" else a for a in args]
    out = cai("sl", "--input", str(HH_PROMPTS), "--base-url", server.base_url, "--model", "m",
              "--run-dir", str(tmp_path / "run"), "--progress", "off", *args)
    assert out.returncode == 2, out.stderr
    assert pattern in out.stderr and "Traceback" not in out.stderr


def test_kill_9_mid_chain_loses_nothing_and_repays_only_in_flight_calls(tmp_path: Path, server: TestServer) -> None:
    server.configure(latency_ms=30)
    n, concurrency = 150, 12
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"red-team question {i}"}) + "\n" for i in range(n)))
    args = [*CAI, "sl", "--input", str(prompts), "--base-url", server.base_url, "--model", "m", "--run-dir",
            str(tmp_path / "run"), "--progress", "off", "--max-concurrency", str(concurrency),
            "--num-revisions", "2", "--set", "sl.shard_rows=10"]
    kills = kill_repeatedly(args, (1.2, 0.8, 1.6, 1.0), server)
    assert kills == 4, "the run finished before it could be killed; raise n"
    assert 0 < read_shards(tmp_path / "run" / "sl").height < n
    final = subprocess.run(args, capture_output=True, text=True, timeout=180)
    assert final.returncode == 0, final.stderr
    shards = read_shards(tmp_path / "run" / "sl", unique_by=None)
    assert shards.height == n and shards["id"].n_unique() == n  # none lost, none duplicated
    assert (shards["status"] == "ok").all() and (shards["num_rounds"] == 2).all()
    stats = server.stats()
    assert stats["unique"] == n * 5
    assert stats["repeats"] <= kills * concurrency  # at most the calls in flight at each kill were paid again


def test_hosted_recipe_runs_by_changing_only_the_endpoint(tmp_path: Path, server: TestServer) -> None:
    secret = "sk-test-4f2a9c1e77"
    server.configure(api_key=secret)
    recipe_path = Path(__file__).resolve().parent.parent / "recipes" / "hosted-openai.yaml"
    env = {**os.environ, "OPENAI_API_KEY": secret}
    out = cai("run", str(recipe_path), "--set", f"engine.groups.policy=[{{backend: openai, model: m, base_url: "
              f"'{server.base_url}', api_key_env: OPENAI_API_KEY, price_in: 0.15, price_out: 0.6}}]",
              "--set", f"run_dir={tmp_path / 'run'}", "--set", "sl.limit=4", "--set", "engine.progress=off", env=env)
    assert out.returncode == 0, out.stderr
    assert "sl: 4 written" in out.stderr and "cost: $0.0" in out.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["engine"]["cost_usd"] > 0
    leaked = [p for p in (tmp_path / "run").rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert leaked == [] and secret not in out.stderr + out.stdout
    assert "OPENAI_API_KEY" in (tmp_path / "run" / "config.yaml").read_text()
    missing = cai("run", str(recipe_path), "--set", f"run_dir={tmp_path / 'run2'}",
                  env={k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"})
    assert missing.returncode == 2 and "OPENAI_API_KEY" in missing.stderr
