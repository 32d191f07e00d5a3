"""Revision quality gates: each gate on hand-written texts (pass and fail, hand-worked numbers), the defaults on
public good revisions and on the test server's revisions, and an SL run with planted good and bad revisions:
retried once, the previous response kept, recorded per step, counted in the run table and on the card, and kept
out of the exports unless ``export.keep_failed_gates``."""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import polars as pl
import pytest
from pydantic import ValidationError

from cai_async import Recipe, load_constitution, read_shards, run_recipe
from cai_async.card import card_data, card_markdown
from cai_async.gates import (
    GATES,
    GateConfig,
    GateTally,
    check_revision,
    copied_share,
    meta_phrases,
    repeated_ngram_share,
    similarity,
)
from cai_async.stages.sl import CHAIN_SCHEMA, gate_summary
from tests.conftest import PUBLIC_DATA, TestServer
from tests.test_cli import cai

# ---------------------------------------------------------------------------------------------------------------
# the measures, by hand


def test_similarity_is_difflibs_ratio_on_normalised_text() -> None:
    assert similarity("abcd", "abce") == 0.75  # 2 × 3 matched ÷ 8 characters
    assert similarity("Hello   World\n", "hello world") == 1.0  # case and spacing are ignored
    assert similarity("", "anything") == 0.0 and similarity("x", "") == 0.0


def test_copied_share_counts_words_in_runs_of_three_or_more() -> None:
    # "please rewrite the response" (4 of 5 words) is a run copied from the request
    assert copied_share("Please rewrite the response now", "Please rewrite the response to be kind.") == 0.8
    # two-word runs do not count: "the response" alone is ordinary language
    assert copied_share("Keep the response short and kind", "Rewrite the response to be safe") == 0.0


def test_repeated_ngram_share() -> None:
    # 4-grams of "a b c d a b c d": abcd bcda cdab dabc abcd → 5, of which 4 distinct
    assert repeated_ngram_share("a b c d a b c d", 4) == pytest.approx(0.2)
    assert repeated_ngram_share("one two three", 4) == 0.0


# ---------------------------------------------------------------------------------------------------------------
# each gate: a text that passes and one that fails

PROMPT = "How do I get into my house? I locked myself out."
INITIAL = "Break a window at the back where the neighbours cannot see you."
CRITIQUE = ("The last response is not helpful to the person, because breaking a window is dangerous and it "
            "gives no safe way to get back into the house.")
REVISION_REQUEST = "Rewrite the response so that it is safe and still helps the person get back inside."
GOOD = ("If you are locked out of your own home, call a licensed locksmith or your landlord; they can let you in "
        "safely. A neighbour or family member with a spare key is another quick option.")


def check(revision: str, **overrides: Any) -> Any:
    arguments: dict[str, Any] = {"critique": CRITIQUE, "revised": INITIAL, "prompt": PROMPT,
                                 "requests": {"the revision request": REVISION_REQUEST}, "finish_reason": "stop"}
    return check_revision(revision, **{**arguments, **overrides})


def test_a_good_revision_passes_every_gate() -> None:
    report = check(GOOD)
    assert report.passed and report.failed is None and report.failed_gates == []
    assert [r.gate for r in report.results] == list(GATES)
    assert report.result("copies_critique").number < 0.4  # type: ignore[union-attr]


@pytest.mark.parametrize(("revision", "finish_reason", "gate", "number"), [
    (CRITIQUE, "stop", "copies_critique", 1.0),
    # a cut-down copy: every word sits in a run copied from the critique, though the ratio is lower
    ("Breaking a window is dangerous and it gives no safe way to get back into the house.", "stop",
     "copies_critique", 1.0),
    (PROMPT, "stop", "restates_request", 1.0),
    ("Rewrite the response so that it is safe.", "stop", "restates_request", 1.0),
    (INITIAL, "stop", "unchanged", 1.0),
    ("My previous answer was wrong. Call a locksmith to let you in.", "stop", "meta", 1.0),
    ("The response was unsafe; call a locksmith instead.", "stop", "meta", 1.0),
    ("Call a locksmith to get in. " * 6, "stop", "loops", 27 / 33),  # 36 words: 33 4-grams, 6 distinct
    (GOOD, "length", "truncated", 1.0),
])
def test_each_gate_fails_what_it_names(revision: str, finish_reason: str, gate: str, number: float) -> None:
    report = check(revision, finish_reason=finish_reason)
    assert report.failed is not None and report.failed.gate == gate
    assert report.failed.number == pytest.approx(number, abs=1e-3)


def test_close_but_not_copied_revisions_pass() -> None:
    # an answer that quotes a little of the critique and the request, reviews nothing, repeats nothing
    assert check("Breaking a window is dangerous. Call a licensed locksmith or your landlord instead.").passed
    # "The answer is…", "My answer is…", "Your response may…" open answers, not reviews of one
    assert check("The answer is simple: call a locksmith, and keep a spare key with a neighbour.").passed
    assert check("My answer is that a locksmith is the safest way in.").passed
    assert check("Your response may be different if you rent: then call your landlord.").passed
    assert check("Call 911 if someone is hurt. The response team will come.").passed
    # a short text is never said to loop, and a list with a shared frame does not
    assert check("No. No. No.").passed
    assert check("1. Call a locksmith.\n2. Call your landlord.\n3. Call a neighbour with a spare key.").passed
    # identical only fails at 1.0: a light edit of the text it revises passes
    assert check(INITIAL.replace("Break", "Do not break")).passed


def test_thresholds_are_configurable_and_null_turns_a_gate_off() -> None:
    loose = GateConfig(copies_critique=None, meta=False)
    assert check(CRITIQUE, config=loose).passed
    strict = GateConfig(unchanged=0.8)
    assert check(INITIAL.replace("Break", "Do not break"), config=strict).failed.gate == "unchanged"  # type: ignore[union-attr]
    with pytest.raises(ValidationError, match="copies_critque"):
        GateConfig.model_validate({"copies_critque": 0.5})
    with pytest.raises(ValidationError, match="less than or equal to 1"):
        GateConfig.model_validate({"copies_critique": 1.5})


def test_meta_phrases() -> None:
    assert meta_phrases("The last response is not helpful to the person") == ["The last response"]
    assert meta_phrases("Yes, no changes are needed. The response does not reveal anything.") == [
        "The response does", "no changes are needed"]
    assert meta_phrases("Rewrite: a message that helps.") == ["Rewrite"]
    assert meta_phrases("I will address this by simply rewriting the response.") == [
        "by simply rewriting the response"]
    assert meta_phrases("The given response fails to protect privacy.") == ["The given response"]
    assert meta_phrases("the human's questions may be harmful") == ["the human's questions"]
    assert meta_phrases("See the revision request above") == ["the revision request"]
    assert meta_phrases("Please rewrite the assistant response to remove harm") == []  # no possessive: a request
    assert meta_phrases("The response to your question is no.") == []


# ---------------------------------------------------------------------------------------------------------------
# the defaults on a public sample of good revisions and responses (false fails)


def _turns(transcript: str, who: str) -> list[str]:
    parts = re.split(r"\n\n(Human|Assistant): ", transcript)
    return [text for speaker, text in zip(parts[1::2], parts[2::2], strict=True) if speaker == who]


def test_public_good_revisions_pass_the_default_gates() -> None:
    # llm-swarm's CAI few-shot chats (Anthropic's and Grok's): prompt, response, critique request, critique,
    # revision request, revision, each with every gate's full context
    chats = 0
    for name in ("constitution_anthropic.json", "constituion_grok.json"):
        for chat in json.loads((PUBLIC_DATA / "llm_swarm" / name).read_text(encoding="utf-8"))["system_chat"]:
            for start in range(0, len(chat) - 5, 6):
                prompt, response, critique_request, critique, revision_request, revision = (
                    m["content"] for m in chat[start:start + 6])
                report = check_revision(revision, critique=critique, revised=response, prompt=prompt, requests={
                    "the critique request": critique_request, "the revision request": revision_request})
                assert report.passed, (name, report.failed)
                chats += 1
    assert chats == 8
    # the built-in constitutions' few-shot revisions
    for name in ("seed", "harmless"):
        for example in load_constitution(name).few_shot:
            assert check_revision(example.revision, critique=example.critique, revised=example.response,
                                  prompt=example.prompt).passed


def test_public_capable_responses_pass_the_default_gates() -> None:
    # hh-rlhf harmless-base chosen answers (the bundled 250) and Self-Instruct's human-written outputs: the gates
    # a response alone can fail (restating the request, meta talk, loops)
    failed: list[str] = []
    with gzip.open(PUBLIC_DATA / "hh_rlhf" / "harmless-base" / "test.jsonl.gz", "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    for row in rows:
        answer, request = _turns(row["chosen"], "Assistant")[-1], _turns(row["chosen"], "Human")[-1]
        if not check_revision(answer, prompt=request).passed:
            failed.append(answer)
    tasks = [json.loads(line) for line in (PUBLIC_DATA / "self_instruct" / "seed_tasks.jsonl").open(encoding="utf-8")]
    outputs = 0
    for task in tasks:
        for instance in task["instances"]:
            outputs += 1
            if not check_revision(instance["output"], prompt=f"{task['instruction']}\n{instance['input']}").passed:
                failed.append(instance["output"])
    assert (len(rows), outputs) == (250, 175)
    assert failed == []


# ---------------------------------------------------------------------------------------------------------------
# SL runs on the test server


def sl_recipe(server: TestServer, run_dir: Path, **sl: Any) -> Recipe:
    return Recipe.model_validate({
        "run_dir": str(run_dir),
        "engine": {"groups": {"policy": [{"name": "srv", "backend": "openai", "model": "m",
                                          "base_url": server.base_url}]},
                   "progress": "off", "retry": {"max_attempts": 2, "initial_s": 0.01, "max_wait_s": 0.05}},
        "sl": sl,
    })


def run(server: TestServer, run_dir: Path, **sl: Any) -> dict[str, Any]:
    summary: dict[str, Any] = anyio.run(run_recipe, sl_recipe(server, run_dir, **sl))
    return summary


HH_PROMPTS = PUBLIC_DATA / "hh_rlhf" / "harmless_base_test_first_human_turns.jsonl"
SWARM = PUBLIC_DATA / "llm_swarm"


@pytest.mark.parametrize("constitution", ["seed", "harmless", str(SWARM / "constitution_anthropic.json"),
                                          str(SWARM / "constituion_grok.json")])
def test_the_test_servers_revisions_pass(tmp_path: Path, server: TestServer, constitution: str) -> None:
    summary = run(server, tmp_path / "run", input=str(HH_PROMPTS), id_column="id", limit=6, num_revisions=2,
                  constitution=constitution)
    gates = summary["stages"]["sl"]["gates"]
    assert gates["revision_steps"] >= 12 and gates["first_failed"] == 0 and gates["rejected"] == 0
    assert summary["stages"]["sl"]["exports"]["sft"]["sl_rows"] == 6
    assert server.stats()["ok"] == 6 + 2 * gates["revision_steps"]  # no retry was needed


PLANT_CRITIQUE = "[plant:critique]"
PLANT_REVISION = "[plant:revision]"
LOOP = "I can help you with that. " * 6  # 36 words: under revision_max_tokens=40
LONG = GOOD + (" If nobody can come, ask the police non-emergency line for advice; do not climb in through a window, "
               "which is how people get hurt.")  # 56 words: cut at revision_max_tokens=40
SAME = "Try the back door first, then call a locksmith."


def planted_rules() -> list[dict[str, Any]]:
    """Answers by step and by prompt: the critique always the same, the revision per prompt's first word."""
    revision = {"last": PLANT_REVISION}
    return [
        {"first": "same", "last": "same", "reply": SAME},  # the initial response of the "same" prompt
        {"last": PLANT_CRITIQUE, "reply": CRITIQUE},
        {**revision, "first": "bad", "reply": CRITIQUE},  # copies its critique (and talks about "the last response")
        {**revision, "first": "flaky", "seed": 0, "reply": LOOP},  # loops; the retry (seed 1) gets a good one
        {**revision, "first": "cut", "reply": LONG},
        {**revision, "first": "echo", "reply": "echo: how do I get into my house when I am locked out?"},
        {**revision, "first": "same", "reply": SAME},
        {**revision, "first": "meta", "reply": "The previous answer was unkind. Call a locksmith instead."},
        {**revision, "reply": GOOD},
    ]


PROMPTS = {"good-1": "good: how do I get into my house when I am locked out?",
           "good-2": "good: what if I lost my car keys?",
           "bad": "bad: how do I get into my house when I am locked out?",
           "flaky": "flaky: how do I open a stuck door?",
           "cut": "cut: how do I get into my house when I am locked out?",
           "echo": "echo: how do I get into my house when I am locked out?",
           "same": "same answer please: how do I get in?",
           "meta": "meta: how do I get into my house when I am locked out?"}
GATED = {"bad": "copies_critique", "cut": "truncated", "echo": "restates_request", "same": "unchanged", "meta": "meta"}


@pytest.fixture
def planted(tmp_path: Path, server: TestServer) -> Iterator[dict[str, Any]]:
    """The test server with planted answers, and the prompts and constitution that meet them."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in PROMPTS.items()),
                       encoding="utf-8")
    constitution = tmp_path / "c.yaml"
    constitution.write_text(
        "name: planted\nprinciples:\n"
        f"  - {{name: kind, critique: 'Point out what is wrong with the last response. {PLANT_CRITIQUE}', "
        f"revision: 'Rewrite the response so that it is safe and kind. {PLANT_REVISION}'}}\n", encoding="utf-8")
    server.configure(replies=planted_rules())
    try:
        yield {"input": str(prompts), "id_column": "id", "constitution": str(constitution), "num_revisions": 1,
               "revision_max_tokens": 40}
    finally:
        server.configure(replies=[])


def test_planted_bad_revisions_are_retried_rejected_recorded_and_kept_out_of_the_exports(
    tmp_path: Path, server: TestServer, planted: dict[str, Any]
) -> None:
    run_dir = tmp_path / "run"
    summary = run(server, run_dir, **planted)
    stage = summary["stages"]["sl"]
    assert stage["ok"] == 8
    # 8 initial + 8 critiques + 8 revisions + a retry for each of the 6 that failed at first
    assert server.stats()["ok"] == 8 * 3 + 6
    chains = {r["id"]: r for r in read_shards(run_dir / "sl").iter_rows(named=True)}
    for chain_id in ("good-1", "good-2"):
        step = chains[chain_id]["rounds"][0]
        assert (step["gate"], step["gate_attempts"], step["gates_first"], step["rejected"]) == (None, 1, [], None)
        assert step["revision"] == GOOD == chains[chain_id]["final_response"]
        assert (chains[chain_id]["revisions_passed"], chains[chain_id]["revisions_failed"]) == (1, 0)
    flaky = chains["flaky"]["rounds"][0]
    assert flaky["gates_first"] == ["loops"] and flaky["gates_retry"] == [] and flaky["gate_attempts"] == 2
    assert flaky["gate"] is None and flaky["rejected"] == [LOOP.strip()] and flaky["revision"] == GOOD
    assert chains["flaky"]["final_response"] == GOOD
    for chain_id, gate in GATED.items():
        chain = chains[chain_id]
        step = chain["rounds"][0]
        assert step["gate"] == gate and step["gate_attempts"] == 2 and gate in step["gates_first"], chain_id
        assert step["gates_retry"] == step["gates_first"]  # the planted answer does not depend on the seed
        assert step["revision"] is None and len(step["rejected"]) == 2
        assert chain["final_response"] == chain["initial_response"]  # the previous response is kept
        assert (chain["revisions_passed"], chain["revisions_failed"]) == (0, 1)
        assert chain["last_rejected"] == step["rejected"][-1]
    bad = chains["bad"]["rounds"][0]
    assert bad["gate_value"] == 1.0 and bad["gates_first"] == ["copies_critique", "meta"]
    assert chains["echo"]["rounds"][0]["gate_value"] == 1.0 and chains["cut"]["rounds"][0]["gate_value"] == 1.0
    # the run's counts
    assert stage["gates"] == {
        "revision_steps": 8, "first_failed": 6, "first_failed_rate": 0.75,
        "by_gate": {"copies_critique": 1, "restates_request": 1, "unchanged": 1, "meta": 2, "loops": 1,
                    "truncated": 1},
        "by_gate_rate": {"copies_critique": 0.125, "restates_request": 0.125, "unchanged": 0.125, "meta": 0.25,
                         "loops": 0.125, "truncated": 0.125},
        "retried": 6, "retry_passed": 1, "rejected": 5, "rejected_rate": 0.625,
        "rejected_by_gate": {"copies_critique": 1, "restates_request": 1, "unchanged": 1, "meta": 1,
                             "truncated": 1},
        "chains": 8, "chains_without_passing": 5,
    }
    # the exports hold only chains with a revision that passed, and every exported revision passes the gates
    exports = stage["exports"]
    assert exports["sft"]["sl_rows"] == 3 and exports["sft"]["skipped_failed_gates"] == 5
    assert exports["pairs"]["rows"] == 3 and exports["pairs"]["skipped_failed_gates"] == 5
    sft = pl.read_parquet(exports["sft"]["path"])
    assert sorted(sft["id"]) == ["flaky", "good-1", "good-2"]
    for row in sft.iter_rows(named=True):
        chain = chains[row["id"]]
        final = row["messages"][-1]["content"]
        step = chain["rounds"][0]
        assert final == step["revision"] == GOOD
        assert check_revision(final, critique=step["critique"], revised=chain["initial_response"],
                              prompt=chain["prompt"], requests={"the revision request": step["revision_request"]},
                              finish_reason=step["revision_finish_reason"]).passed
    pairs = pl.read_parquet(exports["pairs"]["path"])
    assert sorted(pairs["id"]) == ["flaky", "good-1", "good-2"]

    # keep_failed_gates: the same chains (no call), exported with their last rejected revision
    calls = server.stats()["ok"]
    kept = run(server, run_dir, **planted, export={"keep_failed_gates": True})["stages"]["sl"]
    assert server.stats()["ok"] == calls and kept["skipped_already_done"] == 8
    assert kept["exports"]["sft"]["sl_rows"] == 8 and kept["exports"]["sft"]["kept_failed_gates"] == 5
    sft = {r["id"]: r["messages"][-1]["content"] for r in pl.read_parquet(kept["exports"]["sft"]["path"]).iter_rows(
        named=True)}
    assert sft["bad"] == CRITIQUE and sft["good-1"] == GOOD and sft["same"] == SAME
    # "same": its last rejected revision is its initial response, so the pair is dropped as identical
    assert kept["exports"]["pairs"]["rows"] == 7

    # the constitution card shows the gates per principle and per gate
    data = card_data(planted["constitution"], run_dir=run_dir)
    assert data["run"]["principles"]["kind"]["rejected"] == 5 and data["run"]["principles"]["kind"]["revisions"] == 3
    assert data["run"]["gates"]["rejected"] == 5
    markdown = card_markdown(data)
    assert "| kind | 8 | 0 | 3 | 5 |" in markdown
    assert "8 revisions checked: 6 (75.0%) failed a gate at first, 1 of 6 retries passed, 5 (62.5%) were rejected" \
        in markdown
    assert "| meta | 2 | 25.0% | 1 |" in markdown


def test_gates_off_take_every_revision(tmp_path: Path, server: TestServer, planted: dict[str, Any]) -> None:
    stage = run(server, tmp_path / "run", **planted, gates={"enabled": False})["stages"]["sl"]
    assert server.stats()["ok"] == 8 * 3  # no retry
    assert stage["gates"]["revision_steps"] == 0  # nothing checked
    assert stage["exports"]["sft"]["sl_rows"] == 8
    chains = {r["id"]: r for r in read_shards(tmp_path / "run" / "sl").iter_rows(named=True)}
    assert chains["bad"]["final_response"] == CRITIQUE and chains["bad"]["rounds"][0]["gates_first"] is None


def test_retry_off_keeps_the_previous_response_at_once(tmp_path: Path, server: TestServer,
                                                        planted: dict[str, Any]) -> None:
    stage = run(server, tmp_path / "run", **planted, gates={"retry": False})["stages"]["sl"]
    assert server.stats()["ok"] == 8 * 3
    assert (stage["gates"]["rejected"], stage["gates"]["retried"]) == (6, 0)  # flaky is not retried either
    chains = {r["id"]: r for r in read_shards(tmp_path / "run" / "sl").iter_rows(named=True)}
    assert chains["flaky"]["rounds"][0]["rejected"] == [LOOP.strip()]


def test_a_greedy_chain_retries_once_at_the_retry_temperature_with_another_seed() -> None:
    from backends.types import ChatRequest, ChatResult, Usage
    from cai_async.constitution import Principle
    from cai_async.revision import Reviser, RevisionSettings

    answers = iter([CRITIQUE, CRITIQUE, GOOD])  # the critique, a copy of it, then a good revision
    asked: list[ChatRequest] = []

    class Engine:
        async def chat(self, role: str, request: ChatRequest) -> ChatResult:
            asked.append(request)
            return ChatResult(text=next(answers), finish_reason="stop", usage=Usage())

    reviser = Reviser(Engine(), RevisionSettings(  # type: ignore[arg-type]
        critic_role="critic", revision_role="policy", temperature=0.0, seed=7, gates=GateConfig()))
    principle = Principle(name="kind", critique="Point out what is wrong.", revision=REVISION_REQUEST)
    record: dict[str, Any] = {"rounds": []}
    text = anyio.run(reviser.revise_step, 1, principle, [{"role": "user", "content": PROMPT}], INITIAL, record, [])
    assert text == GOOD
    assert [(r.temperature, r.seed) for r in asked] == [(0.0, 7), (0.0, 7), (0.7, 8)]
    assert asked[2].messages == asked[1].messages  # the same context: only the sampling changes
    step = record["rounds"][0]
    assert step["gates_first"] == ["copies_critique", "meta"] and step["gates_retry"] == []
    assert step["rejected"] == [CRITIQUE] and step["gate"] is None and step["gate_attempts"] == 2


def test_chains_from_before_the_gates_still_read_resume_and_export(tmp_path: Path, server: TestServer) -> None:
    run_dir = tmp_path / "run"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"question {i}"}) + "\n" for i in range(4)),
                       encoding="utf-8")
    run(server, run_dir, input=str(prompts), id_column="id", limit=2)
    # rewrite the shards in the layout from before the gates: no gate fields in the steps, no chain columns
    new_fields = {"gate", "gate_value", "gate_attempts", "gates_first", "gates_retry", "rejected"}
    old_fields = [f.name for f in CHAIN_SCHEMA["rounds"].inner.fields if f.name not in new_fields]  # type: ignore[attr-defined]
    for shard in (run_dir / "sl").glob("part-*.parquet"):
        frame = pl.read_parquet(shard).drop("revisions_passed", "revisions_failed", "last_rejected")
        old = frame.with_columns(pl.col("rounds").list.eval(
            pl.struct([pl.element().struct.field(name) for name in old_fields])))
        assert "gate" not in str(old.schema["rounds"]) and old.height == 2
        old.write_parquet(shard, metadata={"cai_async.format": "1"})
    summary = run(server, run_dir, input=str(prompts), id_column="id", limit=4)
    stage = summary["stages"]["sl"]
    assert stage["skipped_already_done"] == 2 and stage["written"] == 2
    chains = read_shards(run_dir / "sl")
    assert chains.height == 4 and chains["revisions_passed"].to_list().count(None) == 2
    assert stage["gates"]["revision_steps"] == 2  # only the new chains' steps were checked (1 revision each)
    assert stage["exports"]["sft"]["sl_rows"] == 4  # old chains export as before
    assert gate_summary(run_dir / "sl")["chains"] == 4


def test_the_cli_prints_the_gates_line_and_column(tmp_path: Path, server: TestServer, planted: dict[str, Any]) -> None:
    out = cai("sl", "--input", planted["input"], "--constitution", planted["constitution"], "--num-revisions", "1",
              "--base-url", server.base_url, "--model", "m", "--run-dir", str(tmp_path / "run"), "--progress", "off",
              "--set", "sl.id_column=id", "--set", "sl.revision_max_tokens=40")
    assert out.returncode == 0, out.stderr
    assert ("sl/gates: 8 revisions checked, 6 (75%) failed a gate at first (copies_critique 1, restates_request 1, "
            "unchanged 1, meta 2, loops 1, truncated 1), 1 of 6 retries passed, 5 rejected (previous response kept); "
            "5 of 8 chains kept no revision: left out of the exports") in " ".join(out.stderr.split())
    row = next(line for line in out.stderr.splitlines() if line.strip("│┃ ").startswith("sl "))
    assert [c.strip() for c in row.strip("│┃ ").split("│")][6] == "5/8"
    assert "exports/sft.parquet (3 rows)" in out.stderr


def test_unknown_gate_keys_are_rejected(tmp_path: Path, server: TestServer) -> None:
    with pytest.raises(ValidationError, match=r"gates\.loop\n"):
        sl_recipe(server, tmp_path, input="p.jsonl", gates={"loop": 0.5})
    with pytest.raises(ValidationError, match="keep_failed_gate"):
        sl_recipe(server, tmp_path, input="p.jsonl", export={"keep_failed_gate": True})


def test_tally_counts_only_checked_steps() -> None:
    tally = GateTally().update([
        {"rounds": [{"gate_attempts": 0, "gates_first": None}, {"gate_attempts": 1, "gates_first": None}],
         "revisions_passed": 1, "revisions_failed": 0},  # an early stop; a revision the gates did not check
        {"rounds": [{"gate_attempts": 2, "gates_first": ["meta", "loops"], "gates_retry": ["meta"], "gate": "meta"}],
         "revisions_passed": 0, "revisions_failed": 1},
        {"rounds": [{"round": 1}]},  # a row from before the gates
    ])
    assert (tally.steps, tally.first_failed, tally.retried, tally.retry_passed, tally.rejected) == (1, 1, 1, 0, 1)
    assert tally.by_gate == {"meta": 1, "loops": 1} and tally.chains == 3 and tally.chains_without_passing == 1
