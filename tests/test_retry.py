"""cai_async.engine.retry.retry_after_first: the engine's fast path goes on under the tenacity policy exactly as a
call tenacity made from its first attempt (attempt counting, waits, Retry-After, which errors retry)."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

from backends.errors import BackendError, PermanentError, RateLimited, TransientError
from cai_async import RetryConfig
from cai_async.engine.retry import retry_after_first, retry_policy


def failing(errors: list[BackendError], calls: list[int]) -> Callable[[], Awaitable[str]]:
    """An attempt that raises ``errors`` in turn, then answers ``"ok"``."""

    async def attempt() -> str:
        calls.append(len(calls) + 2)  # the fast path made attempt 1
        if errors:
            raise errors.pop(0)
        return "ok"

    return attempt


def fast_path(config: RetryConfig, first: BackendError,
              later: list[BackendError]) -> tuple[Any, list[float], list[int]]:
    slept: list[float] = []
    calls: list[int] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async def main() -> Any:
        try:
            return await retry_after_first(retry_policy(config, sleep=sleep), first, failing(list(later), calls))
        except BackendError as exc:
            return exc

    return anyio.run(main), slept, calls


def test_the_first_failure_counts_as_attempt_one() -> None:
    errors = [TransientError(f"503 #{n}") for n in range(2, 6)]
    outcome, slept, calls = fast_path(RetryConfig(max_attempts=4), TransientError("503 #1"), errors)
    assert calls == [2, 3, 4]  # max_attempts in all, the first one included
    assert len(slept) == 3 and isinstance(outcome, TransientError) and str(outcome) == "503 #4"
    outcome, slept, calls = fast_path(RetryConfig(max_attempts=1), TransientError("503"), [])
    assert (str(outcome), slept, calls) == ("503", [], [])  # nothing left: the first error, no wait


def test_waits_equal_the_policys_when_it_makes_every_attempt() -> None:
    config = RetryConfig(max_attempts=6, initial_s=1.0, max_wait_s=30.0)
    errors: list[BackendError] = [TransientError("503"), TransientError("drop"),
                                  RateLimited("429", retry_after=7.0), TransientError("x"), TransientError("y")]
    random.seed(7)
    _, slept, calls = fast_path(config, errors[0], errors[1:])

    plain: list[float] = []

    async def sleep(seconds: float) -> None:
        plain.append(seconds)

    async def from_the_start() -> None:
        pending = list(errors)

        async def call() -> str:
            if pending:
                raise pending.pop(0)
            return "ok"

        await retry_policy(config, sleep=sleep)(call)

    random.seed(7)
    anyio.run(from_the_start)
    assert slept == plain and len(slept) == 5 and calls == [2, 3, 4, 5, 6]
    assert slept[2] == 7.0  # Retry-After honoured exactly
    assert all(s <= 2 ** n for n, s in enumerate(slept) if n != 2), slept  # jitter up to initial_s * 2**(attempt - 1)


def test_retry_after_of_the_first_failure_and_errors_that_do_not_retry() -> None:
    outcome, slept, calls = fast_path(RetryConfig(), RateLimited("429", retry_after=3.0), [])
    assert (outcome, slept, calls) == ("ok", [3.0], [2])
    later: list[BackendError] = [PermanentError("400"), TransientError("x")]
    outcome, slept, calls = fast_path(RetryConfig(), TransientError("503"), later)
    assert isinstance(outcome, PermanentError) and calls == [2] and len(slept) == 1  # a 4xx is not retried
    horizon = RetryConfig(max_wait_s=5.0)
    outcome, slept, _ = fast_path(horizon, RateLimited("429", retry_after=60.0), [])
    assert (outcome, slept) == ("ok", [0.0])  # past max_wait_s: another endpoint at once


def test_max_time_counts_from_the_first_failure() -> None:
    clock = [0.0]
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async def main() -> None:
        async def attempt() -> str:
            clock[0] += 4.0
            raise TransientError("slow 503")

        policy = retry_policy(RetryConfig(max_attempts=100, max_time_s=10.0, initial_s=0.0), sleep=sleep)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("time.monotonic", lambda: clock[0])
            with pytest.raises(TransientError, match="slow 503"):
                await retry_after_first(policy, TransientError("first"), attempt)

    anyio.run(main)
    assert len(slept) == 3  # retries at 4 s, 8 s and 12 s after the first failure: the third one ends it
