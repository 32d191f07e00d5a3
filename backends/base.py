"""What a backend says about itself: :class:`BackendTraits` the engine reads, and :class:`BaseBackend`, a
convenience base with no-op lifecycle methods. The contract stays the :class:`backends.types.Backend` protocol;
:func:`traits_of`, :func:`entered` and :func:`summary_of` let the engine treat any conforming object alike
(traits default when a backend declares none)."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from backends.types import Backend, ChatRequest, ChatResult, ScoreRequest, ScoreResult

__all__ = ["DEFAULT_TRAITS", "BackendTraits", "BaseBackend", "entered", "summary_of", "traits_of"]


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendTraits:
    """How the engine should drive a backend. A class attribute ``traits`` declares them; a backend whose traits
    depend on its options sets ``self.traits`` in ``__init__``."""

    queues_calls: bool = False
    """Calls wait in the backend's own queue and go out in rounds (the Batch API): the engine puts no rate,
    concurrency or global limit on them and leaves retries to the backend (it resubmits)."""
    round_items: int = 0
    """With ``queues_calls``: the multi-call items (chains, pairs) worth keeping waiting to fill a round."""
    keeps_prefix_together: bool = False
    """Calls sharing a prefix should follow each other (an in-process model reusing its KV cache): when every
    endpoint of the roles says so, the engine keeps only as many items in flight as the models decode together."""
    sends_rate_limits: bool = False
    """Answers carry ``x-ratelimit-*`` headers: the engine learns the endpoint's limits from them."""
    sequences: int = 1
    """Sequences the backend decodes together (more than 1: it batches concurrent calls itself)."""
    summary_key: str = "backends"
    """The section of the engine's summary that lists this backend's :meth:`BaseBackend.summary`."""


DEFAULT_TRAITS = BackendTraits()


class BaseBackend:
    """A convenience base for backends: default :class:`BackendTraits`, and no-op ``async with``, ``aclose`` and
    ``summary``. Subclasses set ``name`` and implement ``chat`` and ``score``."""

    traits: BackendTraits = DEFAULT_TRAITS
    name: str = ""

    async def chat(self, request: ChatRequest) -> ChatResult:
        """Complete the conversation."""
        raise NotImplementedError

    async def score(self, request: ScoreRequest) -> ScoreResult:
        """Return the probability of each choice as the next answer."""
        raise NotImplementedError

    async def __aenter__(self) -> Any:
        """Start background work (the Batch API's rounds); nothing by default."""
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Stop background work; the engine calls :meth:`aclose` after it."""

    async def aclose(self) -> None:
        """Release connections, threads and models; nothing by default."""

    def summary(self) -> dict[str, Any] | None:
        """Counters and settings for ``summary.json`` (under ``traits.summary_key``); ``None``: nothing to say."""
        return None


def traits_of(backend: Backend) -> BackendTraits:
    """The traits ``backend`` declares, or the defaults for a protocol-conforming object that declares none."""
    traits = getattr(backend, "traits", None)
    return traits if isinstance(traits, BackendTraits) else DEFAULT_TRAITS


def entered(backend: Backend) -> AbstractAsyncContextManager[Any]:
    """``backend`` as an async context manager: itself when it is one, else one that does nothing."""
    if callable(getattr(backend, "__aenter__", None)) and callable(getattr(backend, "__aexit__", None)):
        return backend  # type: ignore[return-value]
    return nullcontext(backend)


def summary_of(backend: Backend) -> dict[str, Any] | None:
    """The backend's ``summary()``, or ``None`` when it has none or it is empty."""
    summary = getattr(backend, "summary", None)
    found = summary() if callable(summary) else None
    return found or None
