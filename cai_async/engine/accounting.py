"""Accounting per endpoint: calls, cache hits, retries, 429s, tokens, latency percentiles, cost."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Accounting", "EndpointStats"]

_RESERVOIR = 20_000


@dataclass
class EndpointStats:
    """Counters of one endpoint (or of the cache, under the name ``cache``)."""

    calls: int = 0
    failures: int = 0
    cache_hits: int = 0
    retries: int = 0
    rate_limited: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    _latencies: list[float] = field(default_factory=list, repr=False)
    _seen: int = field(default=0, repr=False)

    def add_latency(self, seconds: float) -> None:
        """Keep a uniform reservoir sample of latencies (bounded memory for millions of calls)."""
        self._seen += 1
        if len(self._latencies) < _RESERVOIR:
            self._latencies.append(seconds)
        else:
            slot = random.randrange(self._seen)
            if slot < _RESERVOIR:
                self._latencies[slot] = seconds

    def percentile(self, q: float) -> float | None:
        if not self._latencies:
            return None
        ordered = sorted(self._latencies)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    def as_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "failures": self.failures,
            "cache_hits": self.cache_hits,
            "retries": self.retries,
            "rate_limited": self.rate_limited,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost_usd": round(self.cost_usd, 6),
            "latency_p50_s": self.percentile(0.5),
            "latency_p95_s": self.percentile(0.95),
        }


class Accounting:
    """All endpoints' counters plus run totals; ``snapshot()`` is what progress bars and summaries read."""

    def __init__(self) -> None:
        self.endpoints: dict[str, EndpointStats] = {}
        self.done = 0
        self.failed = 0
        self.cache_hits = 0
        self.total: int | None = None
        self.waiting: dict[str, float] = {}
        """Endpoints rate limited past ``retry.max_wait_s``: when (``time.time()``) each takes calls again."""

    def endpoint(self, name: str) -> EndpointStats:
        stats = self.endpoints.get(name)
        if stats is None:
            stats = self.endpoints[name] = EndpointStats()
        return stats

    @property
    def cost_usd(self) -> float:
        return sum(s.cost_usd for s in self.endpoints.values())

    @property
    def tokens(self) -> int:
        return sum(s.prompt_tokens + s.completion_tokens for s in self.endpoints.values())

    def snapshot(self) -> dict[str, Any]:
        now = time.time()
        return {
            "waiting": {name: round(until - now) for name, until in sorted(self.waiting.items()) if until > now},
            "done": self.done,
            "failed": self.failed,
            "total": self.total,
            "cache_hits": self.cache_hits,
            "tokens": self.tokens,
            "cost_usd": round(self.cost_usd, 6),
            "endpoints": {name: s.as_dict() for name, s in sorted(self.endpoints.items())},
        }
