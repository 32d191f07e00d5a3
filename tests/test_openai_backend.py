"""The openai backend over real HTTP against the fault-injecting test server."""

from __future__ import annotations

import ast
import logging
import re

import anyio
import pytest
from pydantic import SecretStr

from backends import (
    AuthenticationFailed,
    BackendSettings,
    BrokenAnswer,
    ChatRequest,
    ConfigError,
    EndpointFault,
    InvalidAnswer,
    PermanentError,
    RateLimited,
    ScoreRequest,
    TransientError,
    Unreachable,
    create_backend,
)
from backends.openai_http import OpenAIBackend, parse_duration, parse_rate_limit_headers, parse_retry_after
from tests.conftest import TestServer

pytestmark = pytest.mark.anyio

USER = [{"role": "user", "content": "Say hello"}]


def backend(server: TestServer, **options: object) -> OpenAIBackend:
    settings = BackendSettings(endpoint="t", model="m", base_url=server.base_url, options=dict(options))
    b = create_backend("openai", settings)
    assert isinstance(b, OpenAIBackend)
    return b


async def test_chat_returns_text_usage_and_rate_headers(server: TestServer) -> None:
    server.configure(rpm=6000, tpm=1_000_000)
    b = backend(server)
    try:
        result = await b.chat(ChatRequest(USER, max_tokens=50, seed=3))
    finally:
        await b.aclose()
    assert result.text.startswith("Reply ") and "Say hello" in result.text
    assert result.finish_reason == "stop"
    assert result.usage.prompt_tokens > 0 and result.usage.completion_tokens > 0
    assert result.rate_limit is not None
    assert result.rate_limit.limit_requests == 6000 and result.rate_limit.limit_tokens == 1_000_000
    assert result.endpoint == "t" and result.latency_s > 0


async def test_score_reads_top_logprobs_normalized(server: TestServer) -> None:
    server.configure(prefer="B")
    b = backend(server)
    try:
        result = await b.score(ScoreRequest(USER))
    finally:
        await b.aclose()
    assert result.method == "logprobs"
    assert result.probs["B"] == pytest.approx(0.9)
    assert sum(result.probs.values()) == pytest.approx(1.0)


async def test_no_logprobs_is_a_clear_error_or_sampled_fallback(server: TestServer) -> None:
    request = ScoreRequest([{"role": "user", "content": "pick @@nologprobs@@"}])
    b = backend(server)
    with pytest.raises(PermanentError, match="score_fallback"):
        await b.score(request)
    await b.aclose()
    b = backend(server, score_fallback="sample", score_samples=4)
    try:
        # The server's plain chat answer does not name a choice: the sampled fallback says so.
        with pytest.raises(PermanentError, match="sampled answers"):
            await b.score(request)
    finally:
        await b.aclose()


@pytest.mark.parametrize(
    ("marker", "error", "pattern"),
    [
        ("@@malformed@@", BrokenAnswer, "with a body that is not JSON: '{\"choices\": \\['"),
        ("@@html@@", BrokenAnswer, "answered an HTML page with status 200: '502 Bad Gateway'"),
        ("@@error200@@", TransientError, "status 200 with an error body: upstream overloaded"),
        ("@@nochoices@@", InvalidAnswer, "no choices"),
        ("@@status:400@@", PermanentError, "rejected \\(400\\)"),
        ("@@status:404@@", PermanentError, "check base_url and the model"),
        ("@@status:503@@", TransientError, "server error 503"),
        ("@@status:408@@", TransientError, "server error 408"),
        ("@@drop@@", TransientError, "connection dropped"),
    ],
)
async def test_bad_answers_translate_to_the_error_tree(
    server: TestServer, marker: str, error: type[Exception], pattern: str
) -> None:
    b = backend(server)
    try:
        with pytest.raises(error, match=pattern):
            await b.chat(ChatRequest([{"role": "user", "content": f"x {marker}"}]))
    finally:
        await b.aclose()


async def test_bodies_cut_short_or_not_utf8_say_what_came_and_count_against_the_endpoint(
    server: TestServer,
) -> None:
    b = backend(server)
    try:
        with pytest.raises(BrokenAnswer) as cut:
            await b.chat(ChatRequest([{"role": "user", "content": "x @@truncate@@"}]))
        with pytest.raises(BrokenAnswer) as garbled:
            await b.chat(ChatRequest([{"role": "user", "content": "x @@badutf8@@"}]))
    finally:
        await b.aclose()
    found = re.search(r"the body was cut short: (\d+) of (\d+) bytes", str(cut.value))
    assert found is not None, cut.value
    received, announced = int(found.group(1)), int(found.group(2))
    assert received == announced * 2 // 5  # the test server sends 40% of what its Content-Length announces
    assert cut.value.cause == found.group(0)
    assert isinstance(cut.value, EndpointFault) and isinstance(garbled.value, EndpointFault)
    # the server plants b"\xff\xfe" right after the answer's '"content":"'; the message shows the bytes around
    found = re.search(r"the body is not valid UTF-8 at byte (\d+) of (\d+) \((b'.*')\)", str(garbled.value))
    assert found is not None, garbled.value
    around = ast.literal_eval(found.group(3))  # 24 bytes before the bad one and 8 from it
    assert around[:-8].endswith(b'"content":"') and around[-8:].startswith(b"\xff\xfe"), around
    assert "not JSON" not in str(garbled.value) and "proxy error" not in str(garbled.value)


async def test_a_trickling_body_is_said_once_naming_timeout_s(
    server: TestServer, caplog: pytest.LogCaptureFixture
) -> None:
    server.configure(trickle_s=1.5)
    settings = BackendSettings(endpoint="slow", model="m", base_url=server.base_url, timeout_s=30,
                               options={"slow_body_s": 0.3})
    b = create_backend("openai", settings)
    texts: list[str] = []

    async def call(index: int) -> None:
        texts.append((await b.chat(ChatRequest([{"role": "user", "content": f"q {index}"}]))).text)

    try:
        with caplog.at_level(logging.WARNING, logger="cai_async.backends"):
            async with anyio.create_task_group() as tg:
                for index in range(4):
                    tg.start_soon(call, index)
    finally:
        await b.aclose()
    said = [r.getMessage() for r in caplog.records if "has sent only" in r.getMessage()]
    assert len(said) == 1 and len(texts) == 4, said  # four trickling answers, one line; each still answered
    assert re.search(r"endpoint slow \(http://127\.0\.0\.1:\d+/v1\) has sent only \d+ of \d+ bytes of an answer in "
                     r"0\.3 s; it is given timeout_s=30 s per call \(at this pace it needs ~\d+ s: slow, but in time\)",
                     said[0]), said[0]


async def test_429_carries_retry_after(server: TestServer) -> None:
    server.configure(rpm=60)  # one request a second, burst of one
    b = backend(server)
    try:
        await b.chat(ChatRequest(USER))
        with pytest.raises(RateLimited) as info:
            await b.chat(ChatRequest(USER))
    finally:
        await b.aclose()
    assert info.value.retry_after is not None and 0 < info.value.retry_after <= 1.0


async def test_unreachable_endpoint_is_transient_with_hint(free_port: int) -> None:
    b = create_backend("openai", BackendSettings(endpoint="dead", base_url=f"http://127.0.0.1:{free_port}/v1"))
    try:
        with pytest.raises(Unreachable, match=r"connection refused to http://127\.0\.0\.1:\d+/v1; is the server"):
            await b.chat(ChatRequest(USER))
    finally:
        await b.aclose()


async def test_wrong_key_never_leaks(server: TestServer) -> None:
    server.configure(api_key="right-key-000")
    secret = "sk-wrong-SECRET-123456"
    b = create_backend(
        "openai", BackendSettings(endpoint="t", base_url=server.base_url, api_key=SecretStr(secret))
    )
    try:
        with pytest.raises(AuthenticationFailed) as info:
            await b.chat(ChatRequest(USER))
    finally:
        await b.aclose()
    assert isinstance(info.value, ConfigError) and not isinstance(info.value, PermanentError)
    assert "authentication failed (401)" in str(info.value)
    assert secret not in str(info.value) and secret not in repr(info.value)
    assert secret not in repr(b)
    assert secret not in repr(BackendSettings(endpoint="t", api_key=SecretStr(secret)))


def test_header_parsing() -> None:
    assert parse_duration("6m0s") == 360.0
    assert parse_duration("20ms") == pytest.approx(0.02)
    assert parse_duration("1h2m3.5s") == pytest.approx(3723.5)
    assert parse_duration("0.5") == 0.5
    assert parse_duration("soon") is None
    assert parse_retry_after({"retry-after-ms": "1500"}) == 1.5
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({}) is None
    info = parse_rate_limit_headers(
        {"x-ratelimit-limit-requests": "500", "x-ratelimit-remaining-requests": "499",
         "x-ratelimit-reset-requests": "120ms", "x-ratelimit-limit-tokens": "30000"}
    )
    assert info is not None and info.limit_requests == 500 and info.remaining_requests == 499
    assert info.reset_requests_s == pytest.approx(0.12) and info.limit_tokens == 30000
    assert parse_rate_limit_headers({}) is None


def test_missing_base_url_and_unknown_backend_are_config_errors() -> None:
    from backends import ConfigError

    with pytest.raises(ConfigError, match="needs base_url"):
        create_backend("openai", BackendSettings(endpoint="x"))
    with pytest.raises(ConfigError, match=r"unknown backend 'nope'.*llamacpp, openai"):
        create_backend("nope", BackendSettings(endpoint="x"))


async def test_a_lone_5xx_or_dropped_connection_is_sent_again_at_once(server: TestServer) -> None:
    server.configure(error_rate=0.3, drop_rate=0.05, seed=3)
    b = backend(server)
    answered = failed = 0
    try:
        for index in range(40):
            try:
                await b.chat(ChatRequest([{"role": "user", "content": f"question {index}"}], max_tokens=4))
                answered += 1
            except TransientError:
                failed += 1  # failed twice in a row: left to the engine's backoff
    finally:
        await b.aclose()
    stats = server.stats()
    assert b.resent > 0 and b.resent == stats["5xx"] + stats["dropped"] - failed  # every first failure resent once
    assert answered + failed == 40 and answered > failed  # one more try rescues most calls, without any backoff
