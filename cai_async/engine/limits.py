"""Rate limiting: token buckets for requests and tokens per minute, learned from headers and 429s."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Awaitable, Callable

import anyio

from backends.types import RateLimitInfo

__all__ = ["EndpointLimits", "TokenBucket"]

Sleep = Callable[[float], Awaitable[None]]


class TokenBucket:
    """A reservation-style token bucket refilled evenly at ``per_minute``.

    Callers reserve first and then sleep for their turn, so waiting callers are served in order without
    polling. The burst is ``burst_s`` seconds' worth of tokens (at least one call).
    """

    def __init__(self, per_minute: float, *, burst_s: float = 0.5, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._burst_s = burst_s
        self.per_minute = per_minute
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * burst_s)
        self._tokens = self.capacity
        self._stamp = clock()

    def set_rate(self, per_minute: float) -> None:
        """Change the rate, keeping reservations already made."""
        self._refill()
        self.per_minute = per_minute
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * self._burst_s)
        self._tokens = min(self._tokens, self.capacity)

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def reserve(self, amount: float) -> float:
        """Reserve ``amount`` tokens; return the seconds to wait before using them."""
        self._refill()
        self._tokens -= amount
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def wait_for(self, amount: float) -> float:
        """Seconds a reservation of ``amount`` made now would wait (nothing is reserved)."""
        self._refill()
        return 0.0 if self._tokens >= amount else (amount - self._tokens) / self.rate

    def cap(self, level: float) -> None:
        """Hold no more than ``level`` tokens (what the endpoint says remains)."""
        self._refill()
        self._tokens = min(self._tokens, level)

    def refund(self, amount: float) -> None:
        """Give back (positive) or take more (negative) tokens after the true usage is known."""
        self._refill()
        self._tokens = min(self.capacity, self._tokens + amount)


class EndpointLimits:
    """RPM/TPM limits of one endpoint: configured, or learned from ``x-ratelimit-*`` headers and 429s."""

    def __init__(
        self,
        *,
        rpm: float | None,
        tpm: float | None,
        learn: bool,
        slow_start: bool = False,
        sleep: Sleep = anyio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self.requests = TokenBucket(rpm, clock=clock) if rpm else None
        self.tokens = TokenBucket(tpm, clock=clock) if tpm else None
        self.configured = bool(rpm or tpm)
        self.learn = learn and not self.configured
        self._paused_until = 0.0
        self._first_answer: anyio.Event | None = None
        self._probe_taken = not (self.learn and slow_start)
        self._done_times: deque[float] = deque(maxlen=2048)
        self._since_429 = 0
        self._last_cut = -1e9
        self._from_headers = False

    @property
    def paused_until(self) -> float:
        """When the pause after the last 429 ends (clock time; in the past when there is none)."""
        return self._paused_until

    @property
    def rpm(self) -> float | None:
        return self.requests.per_minute if self.requests else None

    @property
    def tpm(self) -> float | None:
        return self.tokens.per_minute if self.tokens else None

    async def acquire(self, estimated_tokens: float) -> None:
        """Wait until a call of ``estimated_tokens`` may be sent."""
        if not self._probe_taken:
            # Slow start while limits are unknown: one call goes first, to read the endpoint's headers.
            self._probe_taken = True
            self._first_answer = anyio.Event()
        elif self._first_answer is not None and not self._first_answer.is_set():
            await self._first_answer.wait()
        while True:
            pause = self._paused_until - self._clock()
            if pause <= 0:
                break
            await self._sleep(pause)
        wait = 0.0
        if self.requests is not None:
            wait = max(wait, self.requests.reserve(1.0))
        if self.tokens is not None:
            wait = max(wait, self.tokens.reserve(estimated_tokens))
        if wait > 0:
            await self._sleep(wait)

    def delay(self) -> float:
        """Seconds a call sent now would wait for the request bucket (queued calls ahead of it included)."""
        return self.requests.wait_for(1.0) if self.requests is not None else 0.0

    def pause(self, seconds: float) -> None:
        """Send nothing to this endpoint for ``seconds`` (after a 429)."""
        self._paused_until = max(self._paused_until, self._clock() + seconds)

    def on_success(
        self, info: RateLimitInfo | None, estimated_tokens: float, actual_tokens: int, in_flight: int = 0
    ) -> None:
        """Correct the token estimate and learn limits from headers or probe upward. ``in_flight``: calls
        sent and not yet answered, which the headers' ``remaining`` counts do not know of yet."""
        now = self._clock()
        self._done_times.append(now)
        if self.tokens is not None and actual_tokens:
            self.tokens.refund(estimated_tokens - actual_tokens)
        if not self.learn:
            return
        if info is not None and self._learn_headers(info, in_flight):
            return
        self._since_429 += 1
        if self.requests is not None and self._since_429 >= 50 and not self._from_headers:
            # No headers: probe upward after a clean run of calls.
            self._since_429 = 0
            self.requests.set_rate(self.requests.per_minute * 1.1)

    def _learn_headers(self, info: RateLimitInfo, in_flight: int = 0) -> bool:
        """Take the limits an answer's headers state (a success's or a 429's); ``True`` if there were any."""
        if not (info.limit_requests or info.limit_tokens):
            return False
        self._from_headers = True
        if info.limit_requests:
            remaining = None if info.remaining_requests is None else info.remaining_requests - in_flight
            self.requests = self._learned(self.requests, info.limit_requests, remaining)
        if info.limit_tokens:
            self.tokens = self._learned(self.tokens, info.limit_tokens, info.remaining_tokens)
        return True

    def _learned(self, bucket: TokenBucket | None, limit: float, remaining: int | None) -> TokenBucket:
        """A bucket at the stated limit; a new one starts from what the endpoint says remains less the calls
        still in flight, not full (the first calls, sent before any limit was known, used the burst)."""
        if bucket is None:
            bucket = TokenBucket(limit, clock=self._clock)
            if remaining is not None:
                bucket.cap(remaining)
        elif bucket.per_minute != limit:
            bucket.set_rate(limit)
        return bucket

    def on_rate_limited(self, retry_after: float | None, fallback_s: float, info: RateLimitInfo | None = None) -> None:
        """A 429: pause for ``Retry-After`` (or ``fallback_s``); learn the limits its headers state, or, when
        learning blind, halve the rate."""
        self.pause(retry_after if retry_after is not None else fallback_s)
        self._since_429 = 0
        if not self.learn or (info is not None and self._learn_headers(info)) or self._from_headers:
            return  # configured or told by the headers: the 429s of a first burst do not lower the limit
        now = self._clock()
        if now - self._last_cut < 1.0:
            return  # one cut per second: the 429s of calls already in flight say the same thing
        self._last_cut = now
        recent = [t for t in self._done_times if now - t <= 10.0]
        span = max(1.0, now - recent[0]) if recent else 1.0
        observed_per_min = len(recent) / span * 60.0 if recent else 60.0
        current = self.requests.per_minute if self.requests else observed_per_min
        target = max(6.0, min(current, observed_per_min) * 0.5)
        if self.requests is None:
            self.requests = TokenBucket(target, clock=self._clock)
        elif self.requests.per_minute > target:
            self.requests.set_rate(target)

    def answered(self) -> None:
        """Any answer (success or failure) ends the slow start."""
        if self._first_answer is not None:
            self._first_answer.set()
