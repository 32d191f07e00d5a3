"""Retry policy built from tenacity parts, sleeping with ``anyio.sleep`` (or an injected sleep in tests)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

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

__all__ = ["retry_policy", "retry_wait"]

Sleep = Callable[[float], Awaitable[None]]


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
