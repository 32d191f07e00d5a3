"""The one small error tree of cai-async, translated at the backend edge.

``CaiError`` → ``BackendError`` → ``RateLimited`` / ``TransientError`` (→ ``EndpointFault``: ``Unreachable``,
``BrokenAnswer``) / ``PermanentError``, and ``ConfigError`` for bad configuration (the CLI exits 2: nothing ran).
``RunStopped`` ends a run early (every endpoint of a group down, a rate-limit horizon with ``retry.long_wait:
stop``, a refused key, the budget, a trainer the run launched that failed: ``TrainerFailed``): the CLI exits 4.
``AuthenticationFailed`` (401/403) is both a backend error and a
configuration error: the key is wrong for every call, so a run stops with one message instead of recording
each item as failed for good. Messages say what to fix; they never carry secrets.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AuthenticationFailed",
    "BackendError",
    "BrokenAnswer",
    "BudgetExceeded",
    "CaiError",
    "ConfigError",
    "EndpointDown",
    "EndpointFault",
    "InvalidAnswer",
    "MissingLogprobs",
    "NoChoiceFound",
    "PermanentError",
    "RateLimited",
    "RunStopped",
    "TrainerFailed",
    "TransientError",
    "Unreachable",
    "redact",
]


class CaiError(Exception):
    """Base of every error cai-async raises on purpose."""


class ConfigError(CaiError):
    """A configuration, input file or option is wrong; the message says which and how to fix it."""


class RunStopped(CaiError):
    """A run stopped before its items were done, for a reason that holds for every item (an endpoint group down,
    a long rate-limit wait with ``retry.long_wait: stop``, a refused key, the budget); a rerun resumes."""


class BudgetExceeded(RunStopped):
    """The configured cost cap was reached; no new calls are scheduled."""


class TrainerFailed(RunStopped):
    """A trainer the run launched as a process of its own (OpenRLHF for ``rl_algorithm: ppo``) ran and exited with
    an error: the input was fine, the run stopped there; the message names the trainer's log."""


class EndpointDown(RunStopped):
    """Every endpoint of a group is down (unreachable, or rate limited past ``retry.max_wait_s`` with
    ``retry.long_wait: stop``); the message names each endpoint, its cause and how to check it."""


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
    """A failure worth retrying: 5xx, 408, timeouts, dropped connections, an answer that is not a whole JSON
    body (see :class:`EndpointFault`)."""


class EndpointFault(TransientError):
    """A failure of the endpoint itself, not of one call: enough in a row mark the endpoint *down*
    (``engine.breaker``: probed every ``probe_s``, and the run stops when its whole group stays down for
    ``down_grace_s``). ``cause`` says why in a few words, for the one line that says it is down."""

    def __init__(self, message: str, *, endpoint: str = "", status: int | None = None, cause: str = "") -> None:
        super().__init__(message, endpoint=endpoint, status=status)
        self.cause = cause or message


class Unreachable(EndpointFault):
    """No answer at all: the connection was refused or timed out, or the answer trickled past ``timeout_s``
    (``cause``: ``"connection refused to http://127.0.0.1:9/v1"``)."""


class BrokenAnswer(EndpointFault):
    """An answer that is not a whole JSON body: an HTML page with status 200 (a proxy or gateway), a body cut
    short of its ``Content-Length``, bytes that are not valid UTF-8, text that is not JSON. ``cause`` says what
    was received (``"the body was cut short: 812 of 2048 bytes"``)."""


class PermanentError(BackendError):
    """A failure retrying cannot fix now: 4xx other than 408/429, a bad model file. Recorded in the row; a
    rerun retries it only with ``--retry-errors`` (its subclasses :class:`InvalidAnswer` and
    :class:`MissingLogprobs` are endpoint-side: a rerun retries them by default)."""


class InvalidAnswer(PermanentError):
    """The endpoint answered JSON that is not a usable completion (no choices, no text): endpoint-side, so a
    rerun (perhaps with another model or endpoint) retries the row."""


class MissingLogprobs(PermanentError):
    """A scoring answer without logprobs: use an endpoint with logprobs or ``score_fallback: sample``, then
    rerun (the row is retried)."""


class AuthenticationFailed(BackendError, ConfigError, RunStopped):
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
