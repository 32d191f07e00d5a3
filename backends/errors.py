"""The one small error tree of cai-async, translated at the backend edge.

``CaiError`` → ``BackendError`` → ``RateLimited`` / ``TransientError`` / ``PermanentError``,
and ``ConfigError`` for bad configuration. ``AuthenticationFailed`` (401/403) is both a backend error and a
configuration error: the key is wrong for every call, so a run stops with one message instead of recording
each item as failed for good. Messages say what to fix; they never carry secrets.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AuthenticationFailed",
    "BackendError",
    "BudgetExceeded",
    "CaiError",
    "ConfigError",
    "NoChoiceFound",
    "PermanentError",
    "RateLimited",
    "TransientError",
    "redact",
]


class CaiError(Exception):
    """Base of every error cai-async raises on purpose."""


class ConfigError(CaiError):
    """A configuration, input file or option is wrong; the message says which and how to fix it."""


class BudgetExceeded(CaiError):
    """The configured cost cap was reached; no new calls are scheduled."""


class BackendError(CaiError):
    """A model backend failed to answer a call."""

    def __init__(self, message: str, *, endpoint: str = "", status: int | None = None) -> None:
        super().__init__(message)
        self.endpoint = endpoint
        self.status = status


class RateLimited(BackendError):
    """The endpoint refused the call for rate limiting (HTTP 429); retry after ``retry_after`` seconds."""

    def __init__(
        self,
        message: str,
        *,
        endpoint: str = "",
        status: int | None = 429,
        retry_after: float | None = None,
        rate_limit: Any = None,
    ) -> None:
        super().__init__(message, endpoint=endpoint, status=status)
        self.retry_after = retry_after
        self.rate_limit = rate_limit
        """The ``x-ratelimit-*`` headers of the 429 (a :class:`backends.types.RateLimitInfo`), when sent."""


class TransientError(BackendError):
    """A failure worth retrying: 5xx, 408, timeouts, dropped connections."""


class PermanentError(BackendError):
    """A failure retrying cannot fix: 4xx other than 408/429, a malformed answer, a bad model file."""


class AuthenticationFailed(BackendError, ConfigError):
    """The endpoint refused the API key (401/403): fix the variable named by ``api_key_env`` and rerun. A run
    stops at the first one (nothing is recorded as failed, so the rerun does every item)."""


class NoChoiceFound(PermanentError):
    """A scoring call whose answer named none of the choices (no choice among the top logprobs, or no
    sampled answer naming one): a labeller records it as an abstention."""


def redact(text: str, secrets: list[str] | tuple[str, ...]) -> str:
    """Return ``text`` with every non-trivial secret replaced by ``***``."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text
