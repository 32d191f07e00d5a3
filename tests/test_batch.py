"""Batch mode (OpenAI Batch API) against the test server's local implementation of the documented API
(``tests/server_batches.py``, real HTTP through the official ``openai`` SDK): rounds for chains, splitting at the
limits, resubmission of failed/expired/missing requests, unknown ids recorded, a provider without batches, a
failed batch, recovery of interrupted uploads and creations, kill -9 with batches in flight, budget caps and
batch prices in the plan."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import polars as pl
import pytest

from backends.batch_journal import BatchJournal
from backends.openai_batch import OpenAIBatchBackend, custom_id
from backends.openai_wire import chat_body
from backends.registry import BackendSettings
from backends.types import ChatRequest
from cai_async import Recipe, read_shards, run_recipe
from cai_async.plan import plan_recipe
from tests.conftest import PUBLIC_DATA, TestServer
from tests.test_cli import CAI, cai

HH_PROMPTS = PUBLIC_DATA / "hh_rlhf" / "harmless_base_test_first_human_turns.jsonl"
FAST = {"linger_s": 0.1, "poll_initial_s": 0.02, "poll_max_s": 0.1, "request_retries": 3}


def endpoint(server: TestServer, mode: str = "batch", **batch: Any) -> dict[str, Any]:
    return {"name": "srv", "backend": "openai", "model": "m", "base_url": server.base_url, "mode": mode,
            "price_in": 2.0, "price_out": 8.0, "batch": {**FAST, **batch}}


def recipe(server: TestServer, run_dir: Path, stage: str = "generate", limit: int = 20, mode: str = "batch",
           engine: dict[str, Any] | None = None, **batch: Any) -> Recipe:
    section: dict[str, Any] = {"input": str(HH_PROMPTS), "id_column": "id", "limit": limit}
    if stage == "sl":
        section["num_revisions"] = 1
    return Recipe.model_validate({
        "run_dir": str(run_dir),
        "engine": {"groups": {"policy": [endpoint(server, mode, **batch)]}, "progress": "off", **(engine or {})},
        stage: section,
    })


def run(rec: Recipe) -> dict[str, Any]:
    summary: dict[str, Any] = anyio.run(run_recipe, rec)
    return summary


def test_batch_answers_match_online_at_batch_prices(tmp_path: Path, server: TestServer) -> None:
    online = run(recipe(server, tmp_path / "online", mode="online"))
    server.reset()
    batch = run(recipe(server, tmp_path / "batch"))
    stats = server.stats()
    assert stats["batches"] == 1 and stats["batch_requests"] == 20 and stats.get("ok", 0) == 0  # no online call
    assert batch["stages"]["generate"]["written"] == 20
    left = read_shards(tmp_path / "online" / "generate").sort("id")
    right = read_shards(tmp_path / "batch" / "generate").sort("id")
    assert left["response"].to_list() == right["response"].to_list()
    assert right["completion_tokens"].sum() == left["completion_tokens"].sum() > 0
    # default batch prices are half the online ones
    assert batch["engine"]["cost_usd"] == pytest.approx(online["engine"]["cost_usd"] / 2, rel=1e-6)
    journal = batch["engine"]["batches"]["srv"]
    assert journal["statuses"] == {"completed": 1} and journal["succeeded"] == 20 and journal["in_flight"] == 0
    assert (tmp_path / "batch" / "batches" / "srv" / "journal.sqlite").exists()
    # a rerun asks for nothing: every answer comes from the cache
    server.reset()
    again = run(recipe(server, tmp_path / "batch"))
    assert again["stages"]["generate"]["skipped_already_done"] == 20 and server.stats().get("batches", 0) == 0


def test_chains_go_through_as_rounds(tmp_path: Path, server: TestServer) -> None:
    rec = recipe(server, tmp_path / "run", stage="sl", limit=12)
    section = {"pairs": {"source": "sl"}, "label": {"ensemble": 2, "swap": True}}
    rec.label = type(rec).model_validate({"label": section}).label
    summary = run(rec)
    assert summary["stages"]["sl"]["ok"] == 12
    stats = server.stats()
    # rounds: every initial response; every critique; every revision; then every judgment of every pair
    # (2 principles × 2 orders) together
    assert stats["batches"] == 4 and stats.get("batch_repeats", 0) == 0
    assert stats["batch_requests"] == 36 + 12 * 4
    assert summary["stages"]["label"]["labelled"] == 12
    chains = read_shards(tmp_path / "run" / "sl")
    assert all(r["rounds"][0]["revision"].startswith("Reply ") for r in chains.iter_rows(named=True))


def test_rl_samples_and_judgments_each_take_one_round(tmp_path: Path, server: TestServer) -> None:
    rec = Recipe.model_validate({
        "run_dir": str(tmp_path / "run"),
        "engine": {"groups": {"policy": [endpoint(server)]}, "progress": "off"},
        "label": {"pairs": {"source": "generate", "input": str(HH_PROMPTS), "id_column": "id", "limit": 6, "k": 3,
                         "temperatures": [0.7, 1.0]},
               "label": {"ensemble": 2, "swap": True}},
    })
    summary = run(rec)
    stats = server.stats()
    assert stats["batches"] == 2  # the K samples of every prompt, then every judgment of every pair
    assert stats["batch_requests"] == 6 * 3 + summary["stages"]["label"]["pairs"]["pairs_written"] * 4
    assert summary["stages"]["label"]["labelled"] == summary["stages"]["label"]["pairs"]["pairs_written"] > 0


def test_rounds_split_at_request_and_size_limits(tmp_path: Path, server: TestServer) -> None:
    server.configure(batch_max_requests=7)  # the provider rejects larger batches
    run(recipe(server, tmp_path / "count", max_requests=7))
    assert server.stats()["batches"] == 3 and server.stats()["batch_requests"] == 20  # 7 + 7 + 6
    server.reset()
    server.configure(batch_max_requests=50_000)
    run(recipe(server, tmp_path / "size", max_file_mb=0.002))  # 2,000 bytes: a few requests each
    assert server.stats()["batches"] >= 2 and server.stats()["batch_requests"] == 20
    sizes = BatchJournal(tmp_path / "size" / "batches" / "srv")._db.execute("SELECT bytes FROM batches").fetchall()
    assert len(sizes) == server.stats()["batches"]
    assert max(size for (size,) in sizes) <= 2_000 < sum(size for (size,) in sizes)


def test_expired_and_failed_requests_are_resubmitted_then_recorded(tmp_path: Path, server: TestServer) -> None:
    server.configure(batch_outcome="expired", batch_expire_fraction=0.5)
    summary = run(recipe(server, tmp_path / "run", max_attempts=3))
    stage = summary["stages"]["generate"]
    # 20 → 10 expire → 5 expire → 2 expire (int(5 × 0.5)); three batches, then those two fail for good
    assert server.stats()["batches"] == 3 and server.stats()["batch_requests"] == 20 + 10 + 5
    assert stage["written"] == 18 and stage["failed"] == 2
    assert all("batch_expired" in f["error"] and "3 batches" in f["error"] for f in stage["failures"])
    journal = summary["engine"]["batches"]["srv"]
    assert journal["statuses"] == {"expired": 3} and journal["failed_attempts"] == 10 + 5 + 2
    # raising the limit lets a rerun try the two again
    server.configure(batch_outcome="completed")
    rec = recipe(server, tmp_path / "run", max_attempts=4)
    assert run(rec)["stages"]["generate"]["written"] == 2


def test_server_errors_in_the_error_file_are_retried(tmp_path: Path, server: TestServer) -> None:
    server.configure(batch_error_rate=0.3, seed=3)
    summary = run(recipe(server, tmp_path / "run", max_attempts=5))
    assert summary["stages"]["generate"]["written"] == 20
    assert server.stats()["batches"] >= 2


def test_missing_and_unknown_custom_ids_are_recorded(tmp_path: Path, server: TestServer) -> None:
    server.configure(batch_drop_ids=2, batch_unknown_ids=1)
    summary = run(recipe(server, tmp_path / "run", max_attempts=2))
    stage = summary["stages"]["generate"]
    assert stage["written"] == 18 and stage["failed"] == 2
    assert all("missing from batch" in f["error"] for f in stage["failures"])
    journal = summary["engine"]["batches"]["srv"]
    assert journal["unknown_lines"] == 2  # one per batch, kept in the journal with its line
    db = BatchJournal(tmp_path / "run" / "batches" / "srv")
    rows = db._db.execute("SELECT custom_id, line FROM unknown").fetchall()
    assert {row[0] for row in rows} == {"unknown-batch_000001-0", "unknown-batch_000002-0"}


def test_a_provider_without_batches_is_a_clear_error(tmp_path: Path, server: TestServer) -> None:
    server.configure(batches=False)
    out = cai("generate", "--input", str(HH_PROMPTS), "--limit", "3", "--run-dir", str(tmp_path / "run"),
              "--base-url", server.base_url, "--model", "m", "--batch", "--progress", "off")
    assert out.returncode == 2
    assert "does not support the Batch API" in out.stderr and "mode to online" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_wrong_key_stops_the_run_records_nothing_and_never_leaks(
    tmp_path: Path, server: TestServer
) -> None:
    secret = "sk-batch-SECRET-4242"
    server.configure(api_key="the-right-key")
    run_dir = tmp_path / "run"
    rec = recipe(server, run_dir, stage="sl", limit=4, mode="online")
    rec.engine.groups["policy"][0].api_key_env = "CAI_BATCH_KEY"
    args = ["sl", str(_write(tmp_path, rec)), "--batch"]  # the flag switches the recipe's endpoint to batch
    out = cai(*args, env={**os.environ, "CAI_BATCH_KEY": secret})
    assert out.returncode == 4 and "authentication failed (401)" in out.stderr and "api_key_env" in out.stderr
    assert secret not in out.stderr + out.stdout and "Traceback" not in out.stderr
    assert read_shards(run_dir / "sl").is_empty()  # nothing recorded as failed for good
    server.configure(api_key=secret)
    out = cai(*args, env={**os.environ, "CAI_BATCH_KEY": secret})
    assert out.returncode == 0, out.stderr
    assert set(read_shards(run_dir / "sl")["status"]) == {"ok"} and server.stats()["batches"] == 3
    for file in run_dir.rglob("*"):
        if file.is_file():
            assert secret.encode() not in file.read_bytes(), file


def test_a_failed_batch_fails_its_requests_without_resubmitting(tmp_path: Path, server: TestServer) -> None:
    server.configure(batch_outcome="failed")
    summary = run(recipe(server, tmp_path / "run", limit=5))
    stage = summary["stages"]["generate"]
    assert stage["failed"] == 5 and server.stats()["batches"] == 1
    assert all("failed validation" in f["error"] and "does not support batches" in f["error"]
               for f in stage["failures"])


def settings(server: TestServer, state_dir: Path) -> BackendSettings:
    return BackendSettings(endpoint="srv", model="m", base_url=server.base_url, state_dir=str(state_dir),
                           options={"batch": FAST})


@pytest.mark.parametrize("crash_after", ["upload", "create"])
def test_an_interrupted_upload_or_creation_is_found_not_repeated(
    tmp_path: Path, server: TestServer, crash_after: str
) -> None:
    request = ChatRequest([{"role": "user", "content": "What is a batch?"}], max_tokens=16)
    body = chat_body("m", request)

    async def crash_then_resume() -> str:
        first = OpenAIBatchBackend(settings(server, tmp_path))
        async with first:
            line = (custom_id(body), b'{"custom_id": "%s", "method": "POST", "url": "/v1/chat/completions", '
                    b'"body": %s}\n' % (custom_id(body).encode(), __import__("orjson").dumps(body)))
            entry = first.journal.prepare([line])
            entry = await first._upload(entry)
            if crash_after == "create":
                entry = await first._create(entry)
                # the process died after the provider created the batch but before the id was recorded
                first.journal.update(entry.local_id, state="creating", batch_id=None, status=None)
            else:
                first.journal.update(entry.local_id, state="uploading", file_id=None)
        second = OpenAIBatchBackend(settings(server, tmp_path))
        async with second:
            return (await second.chat(request)).text

    text = anyio.run(crash_then_resume)
    assert text.startswith("Reply ")
    stats = server.stats()
    assert stats["files"] == 1 and stats["batches"] == 1 and stats.get("batch_repeats", 0) == 0


def _recorded_batches(run_dir: Path) -> int:
    """Batches whose provider id the run has committed to its journal (read-only, beside the running process)."""
    path = run_dir / "batches" / "srv" / "journal.sqlite"
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            return int(db.execute("SELECT COUNT(*) FROM batches WHERE batch_id IS NOT NULL").fetchone()[0])
    except sqlite3.OperationalError:  # the table is not created yet
        return 0


def _wait_until(ready: Callable[[], bool], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert time.monotonic() < deadline, "the run never reached the state the test waits for"
        time.sleep(0.02)


def test_kill_9_with_batches_in_flight_submits_nothing_twice(tmp_path: Path, server: TestServer) -> None:
    server.configure(batch_progress_s=1.5)
    run_dir = tmp_path / "run"
    config = _write(tmp_path, recipe(server, run_dir, stage="sl", limit=10))
    kills = 0
    for _ in range(2):  # kill in round 1, then again in a later round
        process = subprocess.Popen([*CAI, "run", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = _recorded_batches(run_dir) + 1
        # kill once the run has recorded the provider's id of its next batch: the batch is in progress there
        _wait_until(lambda p=process, t=target: p.poll() is not None or _recorded_batches(run_dir) >= t)
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            kills += 1
        process.wait()
    assert kills == 2
    shown = cai("show", str(run_dir))
    assert "in_flight: 1" in shown.stdout  # the batch the second kill left behind
    out = cai("run", str(config))
    assert "written" in out.stderr, out.stderr
    stats = server.stats()
    assert stats.get("batch_repeats", 0) == 0  # no request was ever submitted in a second batch
    assert stats["batches"] == 3 and stats["batch_requests"] == 30  # initial, critique, revision rounds
    chains = read_shards(run_dir / "sl")
    assert chains.height == 10 and chains["id"].n_unique() == 10 and set(chains["status"]) == {"ok"}


def test_cancel_stops_paying_for_an_abandoned_run_and_a_rerun_resubmits(tmp_path: Path, server: TestServer) -> None:
    server.configure(batch_progress_s=30)  # a batch that would take long
    run_dir = tmp_path / "run"
    config = _write(tmp_path, recipe(server, run_dir, stage="sl", limit=6))
    process = subprocess.Popen([*CAI, "run", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_until(lambda: _recorded_batches(run_dir) >= 1)  # submitted, and its id on disk
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    listed = cai("batches", "list", str(run_dir))
    assert listed.returncode == 0 and "submitted" in listed.stdout and "batch_000001" in listed.stdout
    out = cai("batches", "cancel", str(run_dir))
    assert out.returncode == 0, out.stderr
    assert "batch_000001  cancelled  6 requests" in out.stdout
    journal = BatchJournal(run_dir / "batches" / "srv")
    assert journal.unfinished() == [] and journal.summary()["failed_attempts"] == 0  # cancelled is not failed
    server.configure(batch_progress_s=0.2)
    assert cai("run", str(config)).returncode == 0
    stats = server.stats()
    assert stats["batch_repeats"] == 6  # only the cancelled requests went again
    assert set(read_shards(run_dir / "sl")["status"]) == {"ok"}


def test_max_cost_stops_scheduling_and_says_how_far_it_got(tmp_path: Path, server: TestServer) -> None:
    rec = recipe(server, tmp_path / "run", limit=40, engine={"budget_usd": 0.002})
    summary = run(rec)
    stage = summary["stages"]["generate"]
    assert stage["stopped"] and "budget of $0.00" in stage["stopped"] and "items finished" in stage["stopped"]
    assert 0 < stage["written"] < 40
    assert summary["engine"]["cost_usd"] <= 0.002  # committed worst cases: never over the budget
    frame = pl.read_ndjson(HH_PROMPTS).head(40)
    assert frame.height == 40


def test_plan_prices_online_and_batch(tmp_path: Path, server: TestServer) -> None:
    plan = plan_recipe(recipe(server, tmp_path / "run", stage="sl", limit=12))
    sl = [row for row in plan["stages"] if row["stage"] == "sl" and row["calls"]]
    for row in sl:
        assert row["cost_usd_batch"] == pytest.approx(row["cost_usd_online"] / 2, abs=1e-4)
        assert row["cost_usd"] == row["cost_usd_batch"]  # the endpoint is in batch mode
        assert row["batch_rounds"] >= 1
    assert plan["total"]["cost_usd_batch"] < plan["total"]["cost_usd_online"]
    out = cai("plan", str(_write(tmp_path, recipe(server, tmp_path / "run", stage="sl", limit=12))))
    assert "batch" in out.stdout and "online" in out.stdout


def _write(tmp_path: Path, rec: Recipe) -> Path:
    import yaml

    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(rec.model_dump(mode="json")))
    return path


def test_evaluation_runs_in_batch_mode_with_the_same_numbers(tmp_path: Path, server: TestServer) -> None:
    from tests.test_eval import eval_recipe

    def groups(mode: str) -> dict[str, Any]:
        return {name: [{**endpoint(server, mode), "name": name}] for name in ("policy", "critic")}

    server.configure(prefer="A")
    online = anyio.run(run_recipe, eval_recipe(tmp_path / "online", groups("online"), ["policy"],
                                               suites=["harmlessness", "overrefusal"]))
    server.reset()
    batch = anyio.run(run_recipe, eval_recipe(tmp_path / "batch", groups("batch"), ["policy"],
                                              suites=["harmlessness", "overrefusal"]))
    assert server.stats().get("ok", 0) == 0 and server.stats()["batches"] >= 2  # answers, then judgments
    left, right = online["stages"]["eval"]["models"]["policy"], batch["stages"]["eval"]["models"]["policy"]
    for key in ("harmful_rate", "overrefusal_rule", "overrefusal_judge"):
        assert left[key]["value"] == right[key]["value"] and left[key]["n"] == right[key]["n"] > 0
