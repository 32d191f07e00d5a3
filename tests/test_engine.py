"""The engine against the real test server: retries, limits, cache, budget, failover, backpressure."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from backends import (
    AuthenticationFailed,
    BrokenAnswer,
    BudgetExceeded,
    ChatRequest,
    ChatResult,
    EndpointDown,
    PermanentError,
    RateLimited,
    ScoreRequest,
    TransientError,
    Usage,
)
from cai_async import EndpointConfig, Engine, EngineConfig, RetryConfig
from cai_async.engine import TokenBucket, retry_policy
from tests.conftest import PUBLIC_DATA, TestServer

pytestmark = pytest.mark.anyio


def config(*endpoints: EndpointConfig, **kwargs: Any) -> EngineConfig:
    return EngineConfig(groups={"policy": list(endpoints)}, **kwargs)


def endpoint(server: TestServer, **kwargs: Any) -> EndpointConfig:
    return EndpointConfig(backend="openai", base_url=server.base_url, model="m", **kwargs)


def requests(n: int, tag: str = "") -> list[ChatRequest]:
    return [ChatRequest([{"role": "user", "content": f"prompt {tag}{i}"}], max_tokens=16) for i in range(n)]


async def run_all(engine: Engine, items: list[ChatRequest], **kwargs: Any) -> dict[int, Any]:
    outcomes: dict[int, Any] = {}
    index = {id(r): i for i, r in enumerate(items)}

    def keep(item: ChatRequest, outcome: Any) -> None:
        outcomes[index[id(item)]] = outcome

    await engine.run_batch(items, lambda r: engine.chat("policy", r), on_result=keep, **kwargs)
    return outcomes


async def test_retry_schedule_without_sleeping() -> None:
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)

    failures: Iterator[Exception] = iter(
        [TransientError("503"), TransientError("drop"), RateLimited("429", retry_after=7.0), TransientError("x")]
    )
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        error = next(failures, None)
        if error is not None:
            raise error
        return "ok"

    policy = retry_policy(RetryConfig(max_attempts=6, initial_s=1.0, max_wait_s=30.0), sleep=fake_sleep)
    result = await policy(flaky)
    assert result == "ok" and calls == 5
    assert len(slept) == 4
    assert 0 <= slept[0] <= 2.0 and 0 <= slept[1] <= 4.0  # full jitter, doubling caps
    assert slept[2] == 7.0  # Retry-After honoured exactly
    assert 0 <= slept[3] <= 16.0


async def test_permanent_errors_are_not_retried_and_attempts_are_capped() -> None:
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)

    async def bad() -> None:
        raise PermanentError("400")

    with pytest.raises(PermanentError):
        await retry_policy(RetryConfig(), sleep=fake_sleep)(bad)
    assert slept == []

    async def always_down() -> None:
        raise TransientError("503")

    with pytest.raises(TransientError):
        await retry_policy(RetryConfig(max_attempts=3), sleep=fake_sleep)(always_down)
    assert len(slept) == 2


def test_token_bucket_reserves_in_order() -> None:
    now = [0.0]
    bucket = TokenBucket(600, burst_s=0.5, clock=lambda: now[0])  # 10/s, burst 5
    waits = [bucket.reserve(1) for _ in range(8)]
    assert waits[:5] == [0, 0, 0, 0, 0]
    assert waits[5:] == pytest.approx([0.1, 0.2, 0.3])
    now[0] = 10.0
    assert bucket.reserve(1) == 0


async def test_faults_lose_nothing(server: TestServer, tmp_path: Path) -> None:
    server.configure(error_rate=0.10, drop_rate=0.02, seed=7)
    cfg = config(endpoint(server), retry=RetryConfig(initial_s=0.01, max_wait_s=0.05, max_attempts=10))
    async with Engine(cfg, run_dir=tmp_path) as engine:
        outcomes = await run_all(engine, requests(300), concurrency=30)
        summary = engine.summary()
        resent = engine.group("policy")[0].backend.resent  # type: ignore[attr-defined]
    assert len(outcomes) == 300
    assert all(isinstance(o, ChatResult) for o in outcomes.values())
    stats = server.stats()
    assert stats["5xx"] > 0 and stats["dropped"] > 0
    # each fault was either sent again at once by the backend or retried by the engine after a backoff
    assert resent > 0 and summary["endpoints"]["policy"]["retries"] + resent >= stats["5xx"] + stats["dropped"]


async def test_configured_rpm_gives_zero_429s(server: TestServer, tmp_path: Path) -> None:
    server.configure(rpm=2400)
    cfg = config(endpoint(server, rpm=2400), cache={"enabled": False})
    async with Engine(cfg, run_dir=tmp_path) as engine:
        outcomes = await run_all(engine, requests(80), concurrency=40)
    assert all(isinstance(o, ChatResult) for o in outcomes.values())
    assert server.stats().get("429", 0) == 0


async def test_limits_learned_from_headers(server: TestServer, tmp_path: Path) -> None:
    server.configure(rpm=2400)
    cfg = config(endpoint(server), cache={"enabled": False})
    async with Engine(cfg, run_dir=tmp_path) as engine:
        outcomes = await run_all(engine, requests(120), concurrency=40)
        summary = engine.summary()
    assert all(isinstance(o, ChatResult) for o in outcomes.values())
    assert summary["limits"]["policy"]["rpm"] == 2400
    assert server.stats().get("429", 0) <= 3


async def test_429s_without_headers_slow_down_and_finish(server: TestServer, tmp_path: Path) -> None:
    server.configure(rpm=1200, send_rate_headers=False)
    cfg = config(endpoint(server), cache={"enabled": False}, retry=RetryConfig(max_attempts=20))
    async with Engine(cfg, run_dir=tmp_path) as engine:
        outcomes = await run_all(engine, requests(60), concurrency=30)
        summary = engine.summary()
    assert all(isinstance(o, ChatResult) for o in outcomes.values())
    learned = summary["limits"]["policy"]["rpm"]
    assert learned is not None and learned <= 1200 * 1.1
    assert summary["endpoints"]["policy"]["rate_limited"] == server.stats().get("429", 0)


async def test_cache_makes_reruns_free_and_survives_reopen(server: TestServer, tmp_path: Path) -> None:
    cfg = config(endpoint(server))
    items = requests(40)
    async with Engine(cfg, run_dir=tmp_path) as engine:
        first = await run_all(engine, items)
        scored = await engine.score("policy", ScoreRequest([{"role": "user", "content": "pick"}]))
    assert server.stats()["ok"] == 41
    async with Engine(cfg, run_dir=tmp_path) as engine:
        second = await run_all(engine, items)
        again = await engine.score("policy", ScoreRequest([{"role": "user", "content": "pick"}]))
        assert engine.accounting.cache_hits == 41
    assert server.stats()["ok"] == 41  # nothing paid twice
    assert [second[i].text for i in range(40)] == [first[i].text for i in range(40)]
    assert all(o.cached for o in second.values()) and again.probs == scored.probs
    off = config(endpoint(server), cache={"enabled": False})
    async with Engine(off, run_dir=tmp_path) as engine:
        await run_all(engine, items[:5])
    assert server.stats()["ok"] == 46


async def test_budget_stops_scheduling(server: TestServer, tmp_path: Path) -> None:
    cfg = config(endpoint(server, price_in=1000.0, price_out=1000.0), budget_usd=0.05, cache={"enabled": False})
    done: list[Any] = []
    async with Engine(cfg, run_dir=tmp_path) as engine:
        report = await engine.run_batch(
            requests(200), lambda r: engine.chat("policy", r), on_result=lambda _, o: done.append(o), concurrency=2
        )
    assert report.stopped is not None and "budget" in report.stopped
    assert any(isinstance(o, BudgetExceeded) for o in done)
    assert report.submitted < 200
    assert server.stats()["ok"] < 200


async def test_failover_and_circuit_breaker(server: TestServer, free_port: int, tmp_path: Path) -> None:
    dead = EndpointConfig(name="dead", base_url=f"http://127.0.0.1:{free_port}/v1", model="m")
    live = EndpointConfig(name="live", base_url=server.base_url, model="m")
    cfg = config(
        dead, live, breaker={"failures": 2, "cooloff_s": 60}, cache={"enabled": False},
        retry=RetryConfig(initial_s=0.0, max_wait_s=0.0),
    )
    async with Engine(cfg, run_dir=tmp_path) as engine:
        outcomes = await run_all(engine, requests(50), concurrency=5)
        summary = engine.summary()
        dead_state = engine.group("policy")[0]
        assert dead_state.open_until > 0  # breaker opened
    assert all(isinstance(o, ChatResult) and o.endpoint == "live" for o in outcomes.values())
    assert summary["endpoints"]["dead"]["failures"] <= 5


async def test_load_balances_by_weight(server: TestServer, tmp_path: Path) -> None:
    heavy = EndpointConfig(name="heavy", base_url=server.base_url, model="m", weight=3)
    light = EndpointConfig(name="light", base_url=server.base_url, model="m", weight=1)
    server.configure(latency_ms=20)
    cfg = config(heavy, light, cache={"enabled": False})
    async with Engine(cfg, run_dir=tmp_path) as engine:
        await run_all(engine, requests(200), concurrency=16)
        calls = {n: s["calls"] for n, s in engine.summary()["endpoints"].items()}
    assert calls["heavy"] + calls["light"] == 200
    assert calls["heavy"] > 2 * calls["light"] > 0


class _CountingBackend:
    """An in-process backend for scheduler-only checks (no I/O to reach)."""

    name = "mem"

    def __init__(self) -> None:
        self.active = 0
        self.peak = 0

    async def chat(self, request: ChatRequest) -> ChatResult:
        self.active += 1
        self.peak = max(self.peak, self.active)
        await anyio.lowlevel.checkpoint()
        self.active -= 1
        return ChatResult(text="ok", finish_reason="stop", usage=Usage(prompt_tokens=1, completion_tokens=1))

    async def score(self, request: ScoreRequest) -> Any:
        raise NotImplementedError

    async def aclose(self) -> None:
        return None


class _GarbledBackend:
    """Answers a body cut short while ``broken`` (a misbehaving server or proxy), else ``ok``."""

    name = "garbled"

    def __init__(self) -> None:
        self.broken = True
        self.calls = 0

    async def chat(self, request: ChatRequest) -> ChatResult:
        self.calls += 1
        await anyio.lowlevel.checkpoint()
        if self.broken:
            raise BrokenAnswer("endpoint 'garbled': the body was cut short: 5 of 10 bytes (the connection closed)",
                               endpoint="garbled", cause="the body was cut short: 5 of 10 bytes")
        return ChatResult(text="ok", finish_reason="stop", usage=Usage(prompt_tokens=1, completion_tokens=1))

    async def score(self, request: ScoreRequest) -> Any:
        raise NotImplementedError

    async def aclose(self) -> None:
        return None


async def test_broken_answers_mark_the_endpoint_down_and_every_waiting_call_stops_with_one_reason(
    tmp_path: Path,
) -> None:
    now = [0.0]

    async def fake_sleep(seconds: float) -> None:
        now[0] += seconds
        await anyio.lowlevel.checkpoint()

    garbled = _GarbledBackend()
    cfg = config(EndpointConfig(name="garbled", backend="garbled", model="m"), cache={"enabled": False},
                 retry={"max_attempts": 20, "initial_s": 0.01},
                 breaker={"failures": 3, "probe_s": 2.0, "down_grace_s": 10.0})
    stops: list[BaseException] = []

    async def call(role: str, index: int) -> None:
        try:
            await engine.chat(role, ChatRequest([{"role": "user", "content": f"{role} {index}"}]))
        except EndpointDown as exc:
            stops.append(exc)

    async with Engine(cfg, backends={"garbled": garbled}, run_dir=tmp_path, sleep=fake_sleep,
                      clock=lambda: now[0]) as engine:
        async with anyio.create_task_group() as tg:
            for role, index in (("policy", 0), ("policy", 1), ("critic", 2)):  # critic: the policy endpoints
                tg.start_soon(call, role, index)
        state = engine.group("policy")[0]
        assert state.down_cause == "the body was cut short: 5 of 10 bytes"
        first = stops[0]
        # three waiting calls in two groups sharing the endpoint: one reason, said once (the same error)
        assert len(stops) == 3 and all(stop is first for stop in stops)
        assert "garbled is down (the body was cut short: 5 of 10 bytes) for 10s" in str(first)
        assert now[0] >= 10.0  # stopped once down_grace_s of (fake) time had passed
        assert garbled.calls <= 3 + 10.0 / 2.0  # the first failures, then at most a probe every probe_s (not 3 × 20)
        # the endpoint heals: the next call (a probe) is answered, and a later stop has its own reason
        garbled.broken = False
        now[0] += 2.0
        assert (await engine.chat("policy", ChatRequest([{"role": "user", "content": "again"}]))).text == "ok"
        assert state.down_cause is None
        garbled.broken = True
        async with anyio.create_task_group() as tg:
            tg.start_soon(call, "policy", 3)
        assert len(stops) == 4 and stops[3] is not first


async def test_backpressure_pulls_items_lazily(tmp_path: Path) -> None:
    mem = _CountingBackend()
    cfg = config(EndpointConfig(name="mem", backend="mem", model="m"), cache={"enabled": False})
    pulled = 0
    max_ahead = 0
    finished = 0

    def items() -> Iterator[ChatRequest]:
        nonlocal pulled, max_ahead
        for i in range(20_000):
            pulled += 1
            max_ahead = max(max_ahead, pulled - finished)
            yield ChatRequest([{"role": "user", "content": str(i)}])

    def done(_: Any, outcome: Any) -> None:
        nonlocal finished
        finished += 1

    async with Engine(cfg, backends={"mem": mem}, run_dir=tmp_path) as engine:
        report = await engine.run_batch(items(), lambda r: engine.chat("policy", r), on_result=done, concurrency=8)
    assert report.succeeded == 20_000 and finished == 20_000
    assert max_ahead <= 8 + 2  # never more items in memory than workers (+ one handed over)
    assert mem.peak <= 8


async def test_api_key_never_reaches_logs_cache_or_errors(
    server: TestServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "sk-live-TOPSECRET-987654"
    monkeypatch.setenv("CAI_TEST_KEY", secret)
    server.configure(api_key="another-key")
    caplog.set_level(logging.DEBUG)
    cfg = config(endpoint(server, api_key_env="CAI_TEST_KEY"))
    async with Engine(cfg, run_dir=tmp_path) as engine:
        with pytest.raises(AuthenticationFailed) as info:  # wrong for every call: the batch stops at once
            await run_all(engine, requests(3))
        good = EndpointConfig(base_url=server.base_url, model="m", api_key_env="CAI_TEST_KEY")
        assert secret not in repr(engine.group("policy")[0].backend) and secret not in repr(good)
    assert "401" in str(info.value) and "api_key_env" in str(info.value)
    assert secret not in str(info.value) and secret not in repr(info.value)
    assert secret not in caplog.text
    server.configure(api_key=secret)
    async with Engine(cfg, run_dir=tmp_path) as engine:
        outcomes = await run_all(engine, requests(3))
    assert all(isinstance(o, ChatResult) for o in outcomes.values())
    for file in tmp_path.rglob("*"):
        if file.is_file():
            assert secret.encode() not in file.read_bytes(), file
    assert secret not in str(cfg.public_dict())


async def test_missing_key_variable_is_a_clear_config_error(server: TestServer, tmp_path: Path) -> None:
    from backends import ConfigError

    cfg = config(endpoint(server, api_key_env="CAI_TEST_UNSET_VARIABLE"))
    with pytest.raises(ConfigError, match=r"CAI_TEST_UNSET_VARIABLE.*is not set"):
        async with Engine(cfg, run_dir=tmp_path):
            pass




@pytest.mark.parametrize("slow_start", [True, False])
async def test_slow_start_holds_calls_until_the_first_answer_only_when_asked(slow_start: bool) -> None:
    from cai_async.engine.limits import EndpointLimits

    limits = EndpointLimits(rpm=None, tpm=None, learn=True, slow_start=slow_start)
    await limits.acquire(10)  # the first call always goes at once
    second = anyio.Event()

    async def call() -> None:
        await limits.acquire(10)
        second.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        await anyio.sleep(0.05)
        assert second.is_set() is (not slow_start)  # held back only in slow start
        limits.answered()  # the first answer (its headers read) releases the rest
        with anyio.fail_after(1):
            await second.wait()


def test_max_cost_flag_stops_a_run(tmp_path: Path, server: TestServer) -> None:
    import subprocess
    import sys

    import yaml

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "run"),
        "engine": {"groups": {"policy": [{"backend": "openai", "model": "m", "base_url": server.base_url,
                                          "price_in": 2.0, "price_out": 8.0}]}, "progress": "off"},
        "generate": {"input": str(PUBLIC_DATA / "hh_rlhf" / "harmless_base_test_first_human_turns.jsonl"),
                     "id_column": "id", "limit": 40},
    }))
    out = subprocess.run([sys.executable, "-m", "cai_async.cli", "run", str(recipe), "--max-cost", "0.002"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 4, out.stderr  # stopped early: a script can tell
    assert "stopped:" in out.stderr and "budget of $0.00" in out.stderr
    assert 0 < server.stats()["ok"] < 40
