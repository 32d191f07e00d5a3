"""Retry policy built from tenacity parts, sleeping with ``anyio.sleep`` (or an injected sleep in tests), and
the way the engine goes on with it after a first attempt made without tenacity (:func:`retry_after_first`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from backends.errors import RateLimited, TransientError
from cai_async.engine.config import RetryConfig

__all__ = ["retry_after_first", "retry_policy", "retry_wait"]

Sleep = Callable[[float], Awaitable[None]]
T = TypeVar("T")


def retry_wait(config: RetryConfig) -> Callable[[RetryCallState], float]:
    """Seconds before the next attempt: ``Retry-After`` when the endpoint gave one (none past ``max_wait_s``:
    the endpoint is then unavailable until that time and the call goes to another one at once), else exponential
    backoff with full jitter between 0 and ``initial_s * 2**attempt`` (capped at ``max_wait_s``)."""
    backoff = wait_random_exponential(multiplier=config.initial_s, max=config.max_wait_s)

    def wait(state: RetryCallState) -> float:
        outcome = state.outcome
        exc = outcome.exception() if outcome is not None else None
        if isinstance(exc, RateLimited) and exc.retry_after is not None:
            if exc.retry_after > config.max_wait_s:
                return 0.0  # a horizon: that endpoint takes no calls until then; try another one now
            return min(float(exc.retry_after), max(config.max_wait_s, 1.0) * 4)
        return float(backoff(state))

    return wait


def retry_policy(config: RetryConfig, *, sleep: Sleep = anyio.sleep) -> AsyncRetrying:
    """Retry 429s, 5xx, 408, timeouts and dropped connections; never other 4xx or malformed answers."""
    return AsyncRetrying(
        stop=stop_after_attempt(config.max_attempts) | stop_after_delay(config.max_time_s),
        wait=retry_wait(config),
        retry=retry_if_exception_type((RateLimited, TransientError)),
        sleep=sleep,
        reraise=True,
    )


async def retry_after_first(policy: AsyncRetrying, first: BaseException, attempt: Callable[[], Awaitable[T]]) -> T:
    """Go on with ``policy`` for a call whose first attempt, made without tenacity (the engine's fast path: no
    per-attempt bookkeeping for the calls that succeed at once), raised ``first``. Tenacity's attempt 1 is that
    failure, replayed rather than made again, so its ``retry``, ``stop`` and ``wait`` see the same attempts, numbers
    and times as if it had made them all; ``attempt`` makes attempts 2 and on. ``policy`` is copied: an
    :class:`AsyncRetrying` keeps the state of the one call it iterates."""
    async for manager in policy.copy():
        with manager:
            if manager.retry_state.attempt_number == 1:
                raise first
            return await attempt()
    raise first  # pragma: no cover - the policy re-raises the last error itself (reraise=True)
