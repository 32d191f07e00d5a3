"""The engine room: scheduler, rate limits, retries, endpoint pool, request cache, accounting, progress."""

from cai_async.engine.accounting import Accounting, EndpointStats
from cai_async.engine.cache import RequestCache, request_key
from cai_async.engine.config import (
    ALWAYS_USED,
    JUDGE,
    JUDGE_NAMES,
    OLD_JUDGE,
    BreakerConfig,
    CacheConfig,
    EndpointConfig,
    EngineConfig,
    RetryConfig,
)
from cai_async.engine.limits import EndpointLimits, TokenBucket
from cai_async.engine.progress import format_progress, plain_progress
from cai_async.engine.retry import retry_policy, retry_wait
from cai_async.engine.scheduler import BatchReport, Engine, estimate_tokens

__all__ = [
    "ALWAYS_USED",
    "JUDGE",
    "JUDGE_NAMES",
    "OLD_JUDGE",
    "Accounting",
    "BatchReport",
    "BreakerConfig",
    "CacheConfig",
    "EndpointConfig",
    "EndpointLimits",
    "EndpointStats",
    "Engine",
    "EngineConfig",
    "RequestCache",
    "RetryConfig",
    "TokenBucket",
    "estimate_tokens",
    "format_progress",
    "plain_progress",
    "request_key",
    "retry_policy",
    "retry_wait",
]
