"""Endpoint state: its backend, limits, concurrency and circuit breaker; and choosing one from a group."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence

import anyio

from backends.types import Backend
from cai_async.engine.config import BreakerConfig, EndpointConfig
from cai_async.engine.limits import EndpointLimits

__all__ = ["EndpointState", "choose_endpoint"]

log = logging.getLogger("cai_async.engine")


class EndpointState:
    """One live endpoint inside the engine."""

    def __init__(
        self,
        config: EndpointConfig,
        backend: Backend,
        breaker: BreakerConfig,
        *,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.name = config.name
        self.backend = backend
        online = config.mode == "online"  # a batch endpoint queues calls: no per-call rate or concurrency limit
        self.limits = EndpointLimits(
            rpm=config.rpm if online else None, tpm=config.tpm if online else None,
            learn=online and config.learn_limits and config.backend == "openai", slow_start=config.slow_start,
            sleep=sleep, clock=clock,
        )
        self.capacity = anyio.CapacityLimiter((config.max_concurrency if online else None) or math.inf)
        self.inflight = 0
        self._breaker = breaker
        self._clock = clock
        self.consecutive_failures = 0
        self.open_until = 0.0

    def available(self, now: float) -> bool:
        return self.open_until <= now

    def record_success(self) -> None:
        self.consecutive_failures = 0

    def record_failure(self) -> None:
        """A transient failure; enough in a row opens the breaker for the cool-off time."""
        self.consecutive_failures += 1
        if self.consecutive_failures >= self._breaker.failures:
            self.open_until = self._clock() + self._breaker.cooloff_s
            log.warning(
                "endpoint %s failed %d times in a row; cooling off for %.0fs",
                self.name, self.consecutive_failures, self._breaker.cooloff_s,
            )


async def choose_endpoint(
    endpoints: Sequence[EndpointState],
    *,
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> EndpointState:
    """The available endpoint with the fewest outstanding requests per unit of weight.

    When every endpoint is cooling off, wait for the first to come back (half-open: it gets traffic again,
    and one more failure reopens the breaker).
    """
    while True:
        now = clock()
        best: EndpointState | None = None
        best_load = 0.0
        for endpoint in endpoints:
            if not endpoint.available(now):
                continue
            load = (endpoint.inflight + 1) / endpoint.config.weight
            if best is None or load < best_load:
                best, best_load = endpoint, load
        if best is not None:
            return best
        await sleep(max(0.0, min(e.open_until for e in endpoints) - now))
