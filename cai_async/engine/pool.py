"""Endpoint state: its backend, limits, concurrency, circuit breaker and health (up, cooling off, down, rate
limited past a horizon); and choosing one from a group, or saying in one line why none can be chosen."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence

import anyio

from backends.base import traits_of
from backends.errors import EndpointDown, EndpointFault, TransientError
from backends.types import Backend
from cai_async.engine.config import BreakerConfig, EndpointConfig, RetryConfig
from cai_async.engine.limits import EndpointLimits
from cai_async.engine.notices import Notices

__all__ = ["EndpointState", "choose_endpoint", "wall_time"]

log = logging.getLogger("cai_async.engine")


def wall_time(clock_time: float, clock: Callable[[], float] = time.monotonic) -> str:
    """A time of ``clock`` as a UTC wall-clock time (``"12:34:56 UTC"``)."""
    return time.strftime("%H:%M:%S UTC", time.gmtime(time.time() + clock_time - clock()))


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
        notices: Notices | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.backend = backend
        self.traits = traits_of(backend)
        """What the backend declares of itself (queues calls for rounds, sends rate-limit headers…)."""
        online = not self.traits.queues_calls  # a queue for rounds (Batch API): no per-call rate or concurrency limit
        self.limits = EndpointLimits(
            rpm=config.rpm if online else None, tpm=config.tpm if online else None,
            learn=online and config.learn_limits and self.traits.sends_rate_limits, slow_start=config.slow_start,
            sleep=sleep, clock=clock,
        )
        self.capacity = anyio.CapacityLimiter((config.max_concurrency if online else None) or math.inf)
        self.inflight = 0
        self._breaker = breaker
        self._clock = clock
        self._notices = notices or Notices(log, clock=clock)
        self.consecutive_failures = 0
        self.open_until = 0.0
        self.down_cause: str | None = None
        """Why the endpoint is down (``None`` while it is up): the cause of its last failure (an EndpointFault)."""
        self.down_since = 0.0
        self.tripped = False
        """The breaker opened (failures in a row): once ``cooloff_s`` has passed, one probe call goes first."""
        self.probing = False
        self.horizon_until = 0.0
        """Rate limited past ``retry.max_wait_s``: no calls before this clock time."""
        self.announced = 0.0
        """The horizon last announced as the wait of a whole group (said once per horizon)."""

    def available(self, now: float) -> bool:
        """Whether a call may go here now: not past a rate-limit horizon or a pause after a 429, not cooling
        off, and when down or tripped only as the one probe call once ``probe_s`` (``cooloff_s``) has passed."""
        if now < self.horizon_until or now < self.limits.paused_until or now < self.open_until:
            return False
        return (self.down_cause is None and not self.tripped) or not self.probing

    def ready_at(self) -> float:
        """The clock time from which the endpoint may take a call again."""
        return max(self.horizon_until, self.limits.paused_until, self.open_until)

    def record_success(self) -> None:
        self.consecutive_failures = 0
        if self.down_cause is not None:
            log.warning("endpoint %s is back up", self.name)
            self.down_cause = None
        self.tripped = False
        self.probing = False

    def record_failure(self, error: TransientError) -> None:
        """A transient failure: enough in a row open the breaker for ``cooloff_s``; when they are failures of the
        endpoint itself (:class:`EndpointFault`: connection failures, timeouts, an HTML page, a body cut short or
        not UTF-8) the endpoint is *down* (probed every ``probe_s``) with their cause."""
        self.consecutive_failures += 1
        self.probing = False
        now = self._clock()
        if isinstance(error, EndpointFault) and (self.down_cause is not None
                                               or self.consecutive_failures >= self._breaker.failures):
            if self.down_cause is None:
                self.down_since = now
                log.warning("endpoint %s is down after %d failures in a row: %s (probing it every %gs)",
                            self.name, self.consecutive_failures, error.cause, self._breaker.probe_s)
            self.down_cause = error.cause
            self.open_until = now + self._breaker.probe_s
        elif self.consecutive_failures >= self._breaker.failures:
            self.open_until = now + self._breaker.cooloff_s
            self.tripped = True
            self._notices.warn(f"breaker:{self.name}", f"endpoint {self.name} failed {self.consecutive_failures} "
                               f"times in a row; cooling off for {self._breaker.cooloff_s:g}s (last: {error})")

    def rate_limited_until(self, wait_s: float, retry: RetryConfig) -> bool:
        """A 429 asking for ``wait_s``: past ``retry.max_wait_s`` it is a horizon (no calls here until then, said
        in one line); ``True`` if it was one."""
        if wait_s <= retry.max_wait_s:
            return False
        until = self._clock() + wait_s
        if until > self.horizon_until + 1.0:
            log.warning("endpoint %s is rate limited until %s (asked to wait %.0fs, more than retry.max_wait_s=%gs); "
                        "its calls go to the group's other endpoints, if any", self.name, wall_time(until, self._clock),
                        wait_s, retry.max_wait_s)
        self.horizon_until = max(self.horizon_until, until)
        return True


def _why_none(role: str, endpoints: Sequence[EndpointState], now: float, clock: Callable[[], float]) -> str:
    parts = []
    for e in endpoints:
        if e.down_cause is not None:
            parts.append(f"{e.name} is down ({e.down_cause})")
        elif e.horizon_until > now:
            parts.append(f"{e.name} is rate limited until {wall_time(e.horizon_until, clock)}")
    return f"every endpoint of group {role!r} is unavailable: " + "; ".join(parts)


async def choose_endpoint(
    endpoints: Sequence[EndpointState],
    *,
    role: str = "",
    retry: RetryConfig | None = None,
    breaker: BreakerConfig | None = None,
    avoid: str = "",
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> EndpointState:
    """The available endpoint with the fewest outstanding requests per unit of weight (among those whose rate
    limit lets a call go now, when there are any).

    ``avoid`` (the endpoint a retried call just failed on) is taken only when no other is available. When none
    is available, wait for the first to come back (half-open: one probe call goes to a down
    endpoint). A group whose every endpoint stays down for ``breaker.down_grace_s`` raises
    :class:`EndpointDown`; one whose endpoints wait past a rate-limit horizon raises it too with
    ``retry.long_wait: stop`` (else the wait is logged once and shown in the progress).
    """
    retry = retry or RetryConfig()
    breaker = breaker or BreakerConfig()
    while True:
        now = clock()
        best: EndpointState | None = None
        best_load = (0.0, 0.0)
        others = avoid and any(e.name != avoid and e.available(now) for e in endpoints)
        for endpoint in endpoints:
            if not endpoint.available(now) or (others and endpoint.name == avoid):
                continue
            # an endpoint whose rate limit would hold the call (after its 429s) loses to one that can take it now
            delay = endpoint.limits.delay() if len(endpoints) > 1 else 0.0
            load = (delay if delay > 0.05 else 0.0, (endpoint.inflight + 1) / endpoint.config.weight)
            if best is None or load < best_load:
                best, best_load = endpoint, load
        if best is not None:
            if best.down_cause is not None or best.tripped:
                best.probing = True
            return best
        wake = min(e.ready_at() for e in endpoints)
        if all(e.down_cause is not None for e in endpoints):
            deadline = max(e.down_since for e in endpoints) + breaker.down_grace_s
            if now >= deadline:
                urls = dict.fromkeys(e.config.base_url.rstrip("/") for e in endpoints if e.config.base_url)
                check = "; ".join(f"curl {url}/models" for url in urls) or "the endpoints' backend and model"
                raise EndpointDown(f"{_why_none(role, endpoints, now, clock)} for {breaker.down_grace_s:g}s; "
                                   f"stopping (finished items are kept; rerun to resume). Check: {check}")
            wake = min(wake, deadline)
        elif all(e.horizon_until > now or e.down_cause is not None for e in endpoints):
            if retry.long_wait == "stop":
                raise EndpointDown(f"{_why_none(role, endpoints, now, clock)}; stopping as retry.long_wait=stop "
                                   "(finished items are kept; rerun after that time, or set "
                                   "engine.retry.long_wait=wait to wait)")
            first = min(endpoints, key=EndpointState.ready_at)
            if first.announced < first.horizon_until:
                first.announced = first.horizon_until
                log.warning("%s; waiting until %s (%.0fs; the progress counts down; engine.retry.long_wait=stop "
                            "stops instead)", _why_none(role, endpoints, now, clock),
                            wall_time(first.ready_at(), clock), first.ready_at() - now)
        # re-check at least every second (a probe may bring one back), and not in a busy loop while one is out
        await sleep(min(max(0.02, wake - now), 1.0))
