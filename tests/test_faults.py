"""Failing well, against the test server: dead endpoints declared down and the stage stopped within seconds,
long Retry-After as a horizon (failover, a visible wait, or a stop), timeouts with their cause, warnings folded,
exit codes a script can trust, reruns that heal endpoint-side errors, accounting across killed processes, and a
chaos run over a healthy and a misbehaving endpoint that loses and duplicates nothing."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml

from backends import ChatRequest, ChatResult, RateLimited, RateLimitInfo, Unreachable
from cai_async import EndpointConfig, Engine, EngineConfig, Recipe, read_shards, run_recipe
from cai_async.configio import _LOADER, read_mapping
from cai_async.engine.progress import format_progress
from cai_async.engine.scheduler import _learned_wait
from cai_async.exitcodes import FAILED_ROWS, OK, STOPPED, USER_ERROR
from tests.conftest import TestServer, kill_repeatedly, start_server
from tests.test_cli import CAI, cai

FAST_RETRY = {"max_attempts": 3, "initial_s": 0.01, "max_wait_s": 0.5}


def prompts(folder: Path, n: int, text: str = "question") -> Path:
    path = folder / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"{text} {i}"}) + "\n" for i in range(n)))
    return path


def write_recipe(folder: Path, endpoints: list[dict[str, Any]], *, stage: str = "sl", n: int = 20,
                 engine: dict[str, Any] | None = None, **section: Any) -> Path:
    """A recipe file: ``endpoints`` as the policy group, ``n`` prompts for ``stage``."""
    source = prompts(folder, n)
    body: dict[str, Any] = {"input": str(source), "id_column": "id", **section}
    if stage == "sl":
        body.setdefault("num_revisions", 1)
    data = {"run_dir": str(folder / "run"),
            "engine": {"groups": {"policy": endpoints}, "progress": "off", "retry": FAST_RETRY, **(engine or {})},
            stage: body}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def live(server: TestServer, name: str = "live", **kwargs: Any) -> dict[str, Any]:
    return {"name": name, "backend": "openai", "model": "m", "base_url": server.base_url, **kwargs}


def summary_of(folder: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((folder / "run" / "summary.json").read_text())
    return data


# --- endpoint health ------------------------------------------------------------------------------------------


def test_a_dead_endpoint_stops_the_stage_within_seconds_with_one_line(
    tmp_path: Path, server: TestServer, free_port: int
) -> None:
    dead = {"name": "dead", "backend": "openai", "model": "m", "base_url": f"http://127.0.0.1:{free_port}/v1"}
    recipe = write_recipe(tmp_path, [dead], n=200, engine={"breaker": {"down_grace_s": 2}})
    start = time.monotonic()
    out = cai("run", str(recipe))
    took = time.monotonic() - start
    assert out.returncode == STOPPED, out.stderr
    assert took < 30, took  # seconds, not every item spending its retries
    cause = f"connection refused to http://127.0.0.1:{free_port}/v1"
    stopped = [line for line in out.stderr.splitlines() if line.startswith("stopped:")]
    assert len(stopped) == 1 and cause in stopped[0] and "curl" in stopped[0], out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.splitlines()) < 12, out.stderr  # warnings folded, not one per attempt
    summary = summary_of(tmp_path)
    assert summary["stopped"]["stage"] == "sl" and cause in summary["stopped"]["reason"]
    assert read_shards(tmp_path / "run" / "sl").is_empty()  # nothing recorded as failed for good
    # the endpoint comes back (here: the recipe points at a live one); the rerun does every chain
    again = cai("run", str(recipe), "--set", f"engine.groups.policy.0.base_url={server.base_url}")
    assert again.returncode == OK, again.stderr
    assert read_shards(tmp_path / "run" / "sl")["status"].to_list() == ["ok"] * 200


@pytest.mark.anyio
async def test_down_endpoints_get_no_traffic_and_warnings_are_folded(
    server: TestServer, free_port: int, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dead = EndpointConfig(name="dead", base_url=f"http://127.0.0.1:{free_port}/v1", model="m")
    cfg = EngineConfig(groups={"policy": [dead, EndpointConfig(name="live", base_url=server.base_url, model="m")]},
                       retry=FAST_RETRY, breaker={"failures": 3, "probe_s": 0.5}, cache={"enabled": False})
    items = [ChatRequest([{"role": "user", "content": f"q {i}"}], max_tokens=8) for i in range(300)]
    outcomes: list[Any] = []
    with caplog.at_level(logging.WARNING, logger="cai_async.engine"):
        async with Engine(cfg, run_dir=tmp_path) as engine:
            await engine.run_batch(items, lambda r: engine.chat("policy", r), on_result=lambda _, o: outcomes.append(o),
                                   concurrency=32)
            dead_state = engine.group("policy")[0]
            assert dead_state.down_cause == f"connection refused to http://127.0.0.1:{free_port}/v1"
            failures = engine.summary()["endpoints"]["dead"]["failures"]
    assert all(isinstance(o, ChatResult) and o.endpoint == "live" for o in outcomes)
    assert failures < 100  # down after a few: then only a probe every 0.5 s
    lines = [r.getMessage() for r in caplog.records]
    assert sum("is down" in line for line in lines) == 1
    assert len(lines) < 10, lines  # the failures fold into a line with a count


@pytest.mark.anyio
async def test_timeouts_say_their_cause(server: TestServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server.configure(trickle_s=4.0)
    slow = EndpointConfig(name="slow", base_url=server.base_url, model="m", timeout_s=0.5)
    cfg = EngineConfig(groups={"policy": [slow]}, retry={"max_attempts": 2, "initial_s": 0.01},
                       cache={"enabled": False})
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="cai_async.engine"):
        async with Engine(cfg, run_dir=tmp_path) as engine:
            with pytest.raises(Unreachable) as info:
                await engine.chat("policy", ChatRequest([{"role": "user", "content": "hi"}], max_tokens=8))
    assert time.monotonic() - start < 10
    assert "no complete answer within 0.5s" in str(info.value) and "timeout_s" in str(info.value)
    assert any("no complete answer within 0.5s" in r.getMessage() for r in caplog.records)
    server.configure(trickle_s=0.3)  # trickling, but within the timeout: answered
    cfg.groups["policy"][0].timeout_s = 5.0
    async with Engine(cfg, run_dir=tmp_path) as engine:
        result = await engine.chat("policy", ChatRequest([{"role": "user", "content": "hi"}], max_tokens=8))
    assert result.text.startswith("Reply ") and server.stats()["trickled"] >= 3


# --- rate-limit horizons --------------------------------------------------------------------------------------


def test_a_long_retry_after_fails_over_at_once(tmp_path: Path, server: TestServer) -> None:
    busy = start_server()
    try:
        busy.configure(retry_after_s=3600)
        recipe = write_recipe(tmp_path, [live(busy, "busy"), live(server)], n=200,
                              engine={"max_concurrency": 16, "retry": {**FAST_RETRY, "max_wait_s": 30}})
        start = time.monotonic()
        out = cai("run", str(recipe))
        assert out.returncode == OK, out.stderr
        assert time.monotonic() - start < 60
        assert sum("busy is rate limited until" in line for line in out.stderr.splitlines()) == 1, out.stderr
        assert busy.stats()["429"] <= 16  # only the calls sent before the first 429 came back
        assert server.stats()["ok"] == 200 * 3
    finally:
        busy.process.terminate()
        busy.process.wait(timeout=10)


def test_a_long_retry_after_with_no_other_endpoint_stops_when_told(tmp_path: Path, server: TestServer) -> None:
    server.configure(retry_after_s=3600)
    recipe = write_recipe(tmp_path, [live(server)], n=50, engine={"retry": {**FAST_RETRY, "long_wait": "stop"}})
    start = time.monotonic()
    out = cai("run", str(recipe))
    assert out.returncode == STOPPED, out.stderr
    assert time.monotonic() - start < 30
    stopped = [line for line in out.stderr.splitlines() if line.startswith("stopped:")]
    assert len(stopped) == 1 and "live is rate limited until" in stopped[0] and "UTC" in stopped[0], out.stderr
    assert "long_wait" in stopped[0]
    assert summary_of(tmp_path)["stopped"]["class"] == "EndpointDown"


@pytest.mark.anyio
async def test_a_long_retry_after_with_no_other_endpoint_waits_visibly(
    server: TestServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server.configure(retry_after_s=3)
    cfg = EngineConfig(groups={"policy": [EndpointConfig(name="only", base_url=server.base_url, model="m")]},
                       retry={**FAST_RETRY, "max_wait_s": 1}, cache={"enabled": False})
    seen: list[str] = []
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="cai_async.engine"):
        async with Engine(cfg, run_dir=tmp_path) as engine:

            async def heal_and_watch() -> None:
                await anyio.sleep(0.5)
                server.configure(retry_after_s=0)  # the endpoint is fine again, but asked us to wait 3 s
                seen.append(format_progress(engine.accounting.snapshot(), 1.0))

            async with anyio.create_task_group() as tg:
                tg.start_soon(heal_and_watch)
                result = await engine.chat("policy", ChatRequest([{"role": "user", "content": "x"}], max_tokens=8))
    took = time.monotonic() - start
    assert result.text.startswith("Reply ")
    assert 2.5 <= took < 15  # waited for the horizon, not for retries to run out
    assert "only rate limited, back in" in seen[0]
    waits = [r.getMessage() for r in caplog.records if "waiting until" in r.getMessage()]
    assert len(waits) == 1 and "only is rate limited until" in waits[0]


def test_a_used_up_limit_without_retry_after_is_a_learned_wait() -> None:
    used_up = RateLimitInfo(limit_requests=100, remaining_requests=0, reset_requests_s=120.0,
                            limit_tokens=10_000, remaining_tokens=0, reset_tokens_s=600.0)
    assert _learned_wait(RateLimited("429", rate_limit=used_up)) == 600.0  # the later of the two resets
    left = RateLimitInfo(limit_requests=100, remaining_requests=3, reset_requests_s=120.0)
    assert _learned_wait(RateLimited("429", rate_limit=left)) is None
    assert _learned_wait(RateLimited("429", retry_after=7.0, rate_limit=used_up)) == 7.0  # Retry-After first


# --- exit codes and reruns that heal ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "said"),
    [
        ({"html": True}, r"ep is down \(answered an HTML page with status 200: '502 Bad Gateway'\)"),
        ({"truncate": True}, r"ep is down \(the body was cut short: (\d+) of (\d+) bytes\)"),
        ({"bad_utf8": True}, r"ep is down \(the body is not valid UTF-8 at byte \d+\)"),
    ],
    ids=["html", "truncate", "bad_utf8"],
)
def test_an_endpoint_answering_garbage_is_declared_down_and_the_rerun_heals(
    tmp_path: Path, server: TestServer, fault: dict[str, bool], said: str
) -> None:
    """An HTML page with status 200, a body cut short of its Content-Length, invalid UTF-8: the endpoint's
    failures, counted toward down like connection errors; the run stops with one line saying what came, exit 4."""
    try:  # (conftest's reset between tests knows html, not the faults added with this test)
        garbage_is_declared_down(tmp_path, server, fault, said)
    finally:
        server.configure(html=False, truncate=False, bad_utf8=False)


def garbage_is_declared_down(tmp_path: Path, server: TestServer, fault: dict[str, bool], said: str) -> None:
    server.configure(**fault)
    n = 20
    recipe = write_recipe(tmp_path, [live(server, "ep")], n=n, engine={"breaker": {"down_grace_s": 2}})
    start = time.monotonic()
    out = cai("run", str(recipe))
    took = time.monotonic() - start
    assert out.returncode == STOPPED, out.stderr
    lines = out.stderr.splitlines()
    stopped = [line for line in lines if line.startswith("stopped:")]
    found = re.search(said, stopped[0]) if len(stopped) == 1 else None
    assert found is not None and "curl" in stopped[0], out.stderr
    if found.groups():  # cut short: 40% of what the Content-Length announced
        assert int(found.group(1)) == int(found.group(2)) * 2 // 5
    assert sum("ep is down after 5 failures in a row" in line for line in lines) == 1, out.stderr
    assert sum("call failed" in line for line in lines) == 1, out.stderr  # the rest fold into the down line
    assert len(lines) == 3, out.stderr  # the first failure, the endpoint down, the stop
    assert "not JSON" not in out.stderr and "Traceback" not in out.stderr
    # before down: the chains' first calls (one each, in flight at once) and at most 4 retries (the 5th failure
    # marks it down); then a probe every probe_s (2 s) in the grace of 2 s. Before, each chain spent 8 attempts.
    assert server.stats()["requests"] <= n + 4 + 2, server.stats()
    assert took < 30, took  # the behaviour is the time: seconds, not minutes of cool-offs
    assert read_shards(tmp_path / "run" / "sl").is_empty()  # nothing recorded as failed for good
    server.configure(html=False, truncate=False, bad_utf8=False)  # healed
    again = cai("run", str(recipe))
    assert again.returncode == OK, again.stderr
    assert read_shards(tmp_path / "run" / "sl")["status"].to_list() == ["ok"] * n


def test_a_trickling_endpoint_is_said_within_seconds_naming_timeout_s(tmp_path: Path, server: TestServer) -> None:
    """A server that sends its answers a few bytes at a time: one line once slow_body_s has passed (8 s by
    default; 1 s here), naming timeout_s; when the calls time out, the endpoint is down and the run stops (exit 4),
    each line said once."""
    server.configure(trickle_s=60)
    recipe = write_recipe(tmp_path, [live(server, "ep", timeout_s=4, options={"slow_body_s": 1})], n=10,
                          engine={"breaker": {"down_grace_s": 1}})
    out = cai("run", str(recipe))
    assert out.returncode == STOPPED, out.stderr
    lines = out.stderr.splitlines()
    said = [index for index, line in enumerate(lines) if "has sent only" in line]
    assert len(said) == 1, out.stderr
    assert re.search(r"endpoint ep \(http://127\.0\.0\.1:\d+/v1\) has sent only \d+ of \d+ bytes of an answer in 1 s; "
                     r"it is given timeout_s=4 s per call \(at this pace it needs ~\d+ s, so it will time out",
                     lines[said[0]]), lines[said[0]]
    down = [index for index, line in enumerate(lines) if "ep is down after" in line]
    assert len(down) == 1 and said[0] < down[0], out.stderr  # said before the first timeout
    assert "no complete answer within 4s" in lines[down[0]] and "bytes of its body came" in lines[down[0]]
    stopped = [line for line in lines if line.startswith("stopped:")]
    assert len(stopped) == 1 and "ep is down (no complete answer within 4s" in stopped[0], out.stderr
    assert summary_of(tmp_path)["stopped"]["class"] == "EndpointDown"


def test_invalid_answers_are_recorded_with_their_class_and_retried_by_a_rerun(
    tmp_path: Path, server: TestServer
) -> None:
    server.configure(nochoices=True)
    recipe = write_recipe(tmp_path, [live(server)], n=6)
    out = cai("run", str(recipe))
    assert out.returncode == FAILED_ROWS, out.stderr
    rows = read_shards(tmp_path / "run" / "sl")
    assert rows["status"].to_list() == ["error"] * 6 and set(rows["error_class"]) == {"InvalidAnswer"}
    server.configure(nochoices=False)
    again = cai("run", str(recipe))
    assert again.returncode == OK, again.stderr
    healed = read_shards(tmp_path / "run" / "sl")
    assert healed.height == 6 and set(healed["status"]) == {"ok"}
    assert read_shards(tmp_path / "run" / "sl", unique_by=None).height == 6  # compaction kept the healed rows only
    answered = server.stats()["ok"]
    assert cai("run", str(recipe)).returncode == OK and server.stats()["ok"] == answered  # nothing left to do


def test_rejected_requests_are_retried_only_with_retry_errors(tmp_path: Path, server: TestServer) -> None:
    source = tmp_path / "p.jsonl"
    source.write_text('{"id": "a", "prompt": "fine"}\n{"id": "b", "prompt": "too long @@status:400@@"}\n')
    args = ["sl", "--input", str(source), "--set", "sl.id_column=id", "--base-url", server.base_url, "--model", "m",
            "--run-dir", str(tmp_path / "run"), "--progress", "off", "--num-revisions", "1"]
    first = cai(*args)
    assert first.returncode == FAILED_ROWS and "1 recorded errors" in first.stderr, first.stderr
    assert "PermanentError 1" in first.stderr
    asked = server.stats()["400"]
    assert cai(*args).returncode == FAILED_ROWS and server.stats()["400"] == asked  # not retried by default
    assert cai(*args, "--retry-errors").returncode == FAILED_ROWS and server.stats()["400"] == asked + 1


def test_missing_logprobs_heal_after_the_suggested_fix(tmp_path: Path, server: TestServer) -> None:
    server.configure(logprobs=False, reply="B")
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"question {i}", "a": "one", "b": "two"}) + "\n"
                              for i in range(3)))
    args = ["label", "--input", str(source), "--set", "label.pairs.id_column=id", "--set", "label.pairs.source=columns",
            "--set", "label.pairs.response_a_column=a", "--set", "label.pairs.response_b_column=b", "--ensemble", "1",
            "--no-swap", "--base-url", server.base_url, "--model", "m", "--run-dir", str(tmp_path / "run"),
            "--progress", "off"]
    out = cai(*args)
    assert out.returncode == FAILED_ROWS, out.stderr
    labels = read_shards(tmp_path / "run" / "rl" / "labels")
    assert set(labels["error_class"]) == {"MissingLogprobs"} and "score_fallback: sample" in labels["error"][0]
    fixed = cai(*args, "--set", "engine.groups.policy.0.options={score_fallback: sample, score_samples: 2}")
    assert fixed.returncode == OK, fixed.stderr
    labels = read_shards(tmp_path / "run" / "rl" / "labels")
    assert set(labels["status"]) == {"ok"} and set(labels["methods"]) == {"sampled"}


def test_a_refused_key_stops_with_exit_4_and_records_where(tmp_path: Path, server: TestServer) -> None:
    server.configure(api_key="the-right-key")
    recipe = write_recipe(tmp_path, [live(server, api_key_env="CAI_FAULTS_KEY")], n=4)
    import os

    out = cai("run", str(recipe), env={**os.environ, "CAI_FAULTS_KEY": "sk-wrong-key-123"})
    assert out.returncode == STOPPED and "authentication failed (401)" in out.stderr, out.stderr
    assert "sk-wrong-key-123" not in out.stderr
    stopped = summary_of(tmp_path)["stopped"]
    assert stopped["stage"] == "sl" and "401" in stopped["reason"] and stopped["class"] == "AuthenticationFailed"


# --- accounting across processes -------------------------------------------------------------------------------


def test_every_process_is_accounted_and_show_says_what_kills_cost(tmp_path: Path, server: TestServer) -> None:
    server.configure(latency_ms=100)
    recipe = write_recipe(tmp_path, [live(server, price_in=1.0, price_out=2.0)], stage="generate", n=300,
                          engine={"max_concurrency": 8}, shard_rows=20)
    args = [*CAI, "run", str(recipe)]
    kills = kill_repeatedly(args, (1.0, 1.4), server)
    assert kills == 2, "the run finished before it could be killed; raise n"
    final = cai("run", str(recipe))
    assert final.returncode == OK, final.stderr
    engine = summary_of(tmp_path)["engine"]
    total = engine["run_total"]
    answered = server.stats()["ok"]
    this_process = sum(e["calls"] for e in engine["endpoints"].values())
    assert total["processes"] == kills + 1 and total["unfinished"]["processes"] == kills
    assert this_process < total["calls"] <= answered
    assert answered - total["calls"] <= kills * 40  # a kill loses the calls in flight and 0.2 s of accounting
    assert total["cost_usd"] > engine["cost_usd"]
    assert f"run total over {kills + 1} processes" in final.stderr
    assert f"calls in this process: {this_process}," in final.stderr  # the per-process figures say so
    show = yaml.safe_load(cai("show", str(tmp_path / "run")).stdout.split("\n\n")[0])
    assert show["calls"] == total["calls"] and show["processes"] == kills + 1
    assert show["unfinished_processes"]["calls"] > 0 and show["calls_paid_twice"] >= 0


# --- smaller: --set list indexes, where a misplaced key belongs, the C YAML loader --------------------------------


def test_set_reaches_list_items_and_misplaced_keys_get_a_hint(tmp_path: Path, server: TestServer) -> None:
    recipe = write_recipe(tmp_path, [live(server), live(server, "second")])
    out = cai("config", str(recipe), "--set", "engine.groups.policy.1.base_url=http://127.0.0.1:1/v1")
    assert out.returncode == 0, out.stderr
    groups = yaml.safe_load(out.stdout)["engine"]["groups"]["policy"]
    assert groups[1]["base_url"] == "http://127.0.0.1:1/v1" and groups[0]["base_url"] == server.base_url
    bad = cai("config", str(recipe), "--set", "engine.groups.policy.5.base_url=x")
    assert bad.returncode == USER_ERROR and "is a list of 2" in bad.stderr
    data = yaml.safe_load(recipe.read_text())
    data["critique_max_tokens"] = 64  # (num_revisions at the top level is an alias now: the method's key)
    data["engine"]["max_wait_s"] = 5
    recipe.write_text(yaml.safe_dump(data))
    out = cai("config", str(recipe))
    assert out.returncode == USER_ERROR
    assert "unknown key critique_max_tokens — did you mean sl.critique_max_tokens?" in out.stderr
    assert "unknown key max_wait_s — did you mean engine.retry.max_wait_s?" in out.stderr


def test_yaml_is_read_with_the_c_loader_where_present(tmp_path: Path) -> None:
    if not getattr(yaml, "__with_libyaml__", False):
        pytest.skip("PyYAML without libyaml")
    assert _LOADER is yaml.CSafeLoader
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump({"principles": [{"name": f"p{i}", "critique": "c " * 20} for i in range(2000)]}))
    assert len(read_mapping(path)["principles"]) == 2000


# --- chaos --------------------------------------------------------------------------------------------------------


def chaos(server: TestServer, stop: threading.Event, phases: list[dict[str, Any]], every_s: float) -> None:
    """Cycle ``server`` through fault ``phases`` until ``stop`` is set, then leave it healthy."""
    while not stop.is_set():
        for phase in phases:
            server.configure(**{"retry_after_s": 0, "dead": False, "trickle_s": 0, **phase})
            if stop.wait(every_s):
                break
    server.configure(retry_after_s=0, dead=False, trickle_s=0)


CHAOS_PHASES = [{"dead": True}, {}, {"trickle_s": 2}, {}, {"retry_after_s": 2}, {}]
"""Dead (connections dropped), healthy, trickling past the timeout, healthy, a 429 storm with a Retry-After past
``max_wait_s``, healthy."""


def chaos_recipe(run_dir: Path, source: Path, healthy: TestServer, flaky: TestServer, n: int) -> Recipe:
    return Recipe.model_validate({
        "run_dir": str(run_dir),
        "engine": {
            "groups": {"policy": [live(healthy, "healthy"), live(flaky, "flaky", timeout_s=1.0)]},
            "progress": "off", "max_concurrency": 64,
            "retry": {"max_attempts": 8, "initial_s": 0.05, "max_wait_s": 1.0},
            "breaker": {"failures": 3, "cooloff_s": 1.0, "probe_s": 0.5},
        },
        "sl": {"input": str(source), "id_column": "id", "limit": n, "num_revisions": 2},
    })


def test_chaos_loses_and_duplicates_nothing(tmp_path: Path, server: TestServer) -> None:
    n = 200
    server.configure(latency_ms=5)
    flaky = start_server("--latency-ms", "5")
    stop = threading.Event()
    driver = threading.Thread(target=chaos, args=(flaky, stop, CHAOS_PHASES, 0.4), daemon=True)
    try:
        driver.start()
        summary = anyio.run(run_recipe, chaos_recipe(tmp_path / "run", prompts(tmp_path, n), server, flaky, n))
        stop.set()
        driver.join(timeout=10)
        stats = flaky.stats()
    finally:
        stop.set()
        flaky.process.terminate()
        flaky.process.wait(timeout=10)
    rows = read_shards(tmp_path / "run" / "sl", unique_by=None)
    assert rows.height == n and rows["id"].n_unique() == n  # 0 lost, 0 duplicated
    assert set(rows["status"]) == {"ok"} and summary["stages"]["sl"]["failed"] == 0
    assert stats.get("429", 0) + stats.get("dead", 0) + stats.get("trickled", 0) > 0  # the chaos did happen

