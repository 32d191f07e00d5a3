"""The engine: fans chat and scoring calls across endpoint groups with limits, retries, cache and accounting."""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import AsyncExitStack, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar, cast

import anyio
import anyio.lowlevel

from backends.base import entered, summary_of
from backends.errors import (
    BackendError,
    BudgetExceeded,
    CaiError,
    ConfigError,
    EndpointDown,
    RateLimited,
    RunStopped,
    TransientError,
)
from backends.registry import create_backend
from backends.types import Backend, ChatRequest, ChatResult, RateLimitInfo, ScoreRequest, ScoreResult, Usage
from cai_async.engine.accounting import Accounting
from cai_async.engine.cache import RequestCache, request_key
from cai_async.engine.config import EngineConfig
from cai_async.engine.ledger import RunLedger
from cai_async.engine.notices import Notices
from cai_async.engine.pool import EndpointState, choose_endpoint
from cai_async.engine.retry import retry_after_first, retry_policy

__all__ = ["BatchReport", "Engine", "estimate_tokens"]

log = logging.getLogger("cai_async.engine")

T = TypeVar("T")
R = TypeVar("R")
Request = ChatRequest | ScoreRequest
Sleep = Callable[[float], Awaitable[None]]


_BOUNDED: ContextVar[bool] = ContextVar("cai_engine_bounded", default=False)


def estimate_tokens(request: Request) -> int:
    """Tokens a call will use, estimated before sending it (~4 characters a token, plus the output cap)."""
    prompt = sum(len(m["content"]) // 4 + 4 for m in request.messages)
    return prompt + (request.max_tokens if isinstance(request, ChatRequest) else 1)


@dataclass
class BatchReport(Generic[T]):
    """How a :meth:`Engine.run_batch` ended."""

    submitted: int = 0
    succeeded: int = 0
    failed: int = 0
    stopped: str | None = None
    """Why scheduling stopped early (budget), or ``None`` when every item was handled."""

    def count(self, outcome: object, accounting: Accounting) -> None:
        """One handled item, in this report and in the engine's ``accounting``: failed when ``outcome`` is a
        :class:`CaiError`, succeeded otherwise."""
        if isinstance(outcome, CaiError):
            self.failed += 1
            accounting.failed += 1
        else:
            self.succeeded += 1
            accounting.done += 1


def _learned_wait(exc: RateLimited) -> float | None:
    """How long a 429 asks to wait: its ``Retry-After``, else the reset time of a limit its headers say is used
    up (``x-ratelimit-remaining-*: 0``)."""
    if exc.retry_after is not None:
        return float(exc.retry_after)
    info = exc.rate_limit
    if not isinstance(info, RateLimitInfo):
        return None
    resets = [reset for left, reset in ((info.remaining_requests, info.reset_requests_s),
                                        (info.remaining_tokens, info.reset_tokens_s)) if left == 0 and reset]
    return max(resets) if resets else None


def _to_cache(result: ChatResult | ScoreResult) -> dict[str, Any]:
    base = {
        "model": result.model,
        "endpoint": result.endpoint,
        "latency_s": result.latency_s,
        "prompt_tokens": result.usage.prompt_tokens,
        "completion_tokens": result.usage.completion_tokens,
    }
    if isinstance(result, ChatResult):
        return {**base, "text": result.text, "finish_reason": result.finish_reason}
    return {**base, "probs": result.probs, "method": result.method}


def _from_cache(kind: str, data: dict[str, Any]) -> ChatResult | ScoreResult:
    usage = Usage(prompt_tokens=data["prompt_tokens"], completion_tokens=data["completion_tokens"])
    common = {"model": data["model"], "endpoint": data["endpoint"], "latency_s": data["latency_s"], "usage": usage}
    if kind == "chat":
        return ChatResult(text=data["text"], finish_reason=data["finish_reason"], cached=True, **common)
    return ScoreResult(probs=data["probs"], method=data["method"], cached=True, **common)


class Engine:
    """Schedules calls over endpoint groups. Use as ``async with Engine(config) as engine: ...``.

    ``run_dir`` holds the request cache (``cache.sqlite``) unless ``config.cache.path`` says otherwise, and the
    ledger of what every process that worked on it spent (``accounting.sqlite``).
    ``backends`` injects ready backend objects by endpoint name (tests, custom code); ``sleep`` and ``clock``
    replace time for tests.
    """

    def __init__(
        self,
        config: EngineConfig,
        *,
        run_dir: str | Path | None = None,
        backends: dict[str, Backend] | None = None,
        sleep: Sleep = anyio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.accounting = Accounting()
        self._run_dir = Path(run_dir) if run_dir is not None else None
        self._injected = dict(backends or {})
        self._sleep = sleep
        self._clock = clock
        self._endpoints: dict[str, EndpointState] = {}
        self._groups: dict[str, list[EndpointState]] = {}
        self._cache: RequestCache | None = None
        self._global: anyio.CapacityLimiter | None = None
        self._retry = retry_policy(config.retry, sleep=sleep)
        self._stack = AsyncExitStack()
        self._committed_usd = 0.0
        self.notices = Notices(log, clock=clock)
        self._ledger: RunLedger | None = None
        self._ledger_saved = 0.0
        self._stops: dict[frozenset[str], EndpointDown] = {}
        """The first :class:`EndpointDown` raised for a set of endpoints (a group; ``critic`` sharing ``policy``'s
        is the same set): the calls that were waiting on them all raise that one, so the run says one reason
        however their causes and group names vary. Forgotten when one of them answers again."""

    @property
    def cache(self) -> RequestCache | None:
        return self._cache

    async def __aenter__(self) -> Engine:
        self._global = anyio.CapacityLimiter(self.config.max_concurrency)
        try:
            for role, endpoints in self.config.groups.items():
                states = []
                for endpoint in endpoints:
                    state = self._endpoints.get(endpoint.name)
                    if state is None:
                        backend = self._injected.get(endpoint.name) or create_backend(
                            endpoint.backend_kind, endpoint.settings(state_dir=self._state_dir(endpoint.name))
                        )
                        await self._stack.enter_async_context(entered(backend))  # background work (Batch API)
                        state = EndpointState(
                            endpoint, backend, self.config.breaker, sleep=self._sleep, clock=self._clock,
                            notices=self.notices,
                        )
                        self._endpoints[endpoint.name] = state
                    states.append(state)
                self._groups[role] = states
            if self.config.cache.enabled:
                path = self.config.cache.path
                if path is None:
                    path = str((self._run_dir or Path(".")) / "cache.sqlite")
                self._cache = RequestCache(path)
            if self._run_dir is not None:
                self._ledger = RunLedger(self._run_dir / "accounting.sqlite")
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _state_dir(self, endpoint: str) -> str:
        """Where an endpoint's backend keeps state across runs: ``<run dir>/batches/<endpoint>``."""
        return str((self._run_dir or Path(".")) / "batches" / endpoint)

    async def aclose(self) -> None:
        """Close every backend and the cache."""
        await self._stack.aclose()  # backends with a task group: must close in this task's own cancel scope
        with anyio.CancelScope(shield=True):
            for state in self._endpoints.values():
                await state.backend.aclose()
        if self._cache is not None:
            self._cache.close()
            self._cache = None
        self.notices.flush()
        if self._ledger is not None:
            self._save_ledger(finished=True)
            self._ledger.close()
            self._ledger = None

    def _save_ledger(self, *, finished: bool = False) -> None:
        """Keep this process's counters in the run's ledger (every 0.2 s of calls, and at the end), so a kill
        loses at most the calls in flight and 0.2 s of accounting."""
        if self._ledger is None:
            return
        self._ledger_saved = self._clock()
        stats = self.accounting.endpoints.values()
        counters: dict[str, float] = {name: sum(getattr(s, name) for s in stats)
                                      for name in ("calls", "failures", "retries", "rate_limited", "prompt_tokens",
                                                   "completion_tokens", "cost_usd")}
        counters["cache_hits"] = self.accounting.cache_hits
        self._ledger.save(counters, finished=finished)

    def group(self, role: str) -> list[EndpointState]:
        """Live endpoints of a role; the judge falls back to ``policy`` (see :meth:`EngineConfig.group`)."""
        if role in self._groups:
            return self._groups[role]
        names = [e.name for e in self.config.group(role)]
        self._groups[role] = resolved = [self._endpoints[name] for name in names]  # looked up once per role
        return resolved

    def item_concurrency(self, *roles: str) -> int:
        """How many multi-call items (chains, pairs) to keep in flight for ``roles``: the engine's cap; with a
        backend that queues calls for rounds, enough items to fill its round; or, when every endpoint keeps calls
        sharing a prefix together (in-process llama.cpp), the sequences each model decodes together (one per model
        when unbatched) — then an item's calls follow each other and reuse the KV cache for their shared prefix
        instead of evicting each other's."""
        endpoints = [state for role in roles for state in self.group(role)]
        rounds = [state.traits.round_items for state in endpoints if state.traits.queues_calls]
        if rounds:  # calls wait for their round: keep enough items waiting to fill it
            return max(rounds)
        if endpoints and all(state.traits.keeps_prefix_together for state in endpoints):  # their sequences
            per_model = {state.config.model: state.traits.sequences for state in endpoints}
            return max(1, sum(per_model.values()))
        return self.config.max_concurrency

    async def chat(self, role: str, request: ChatRequest) -> ChatResult:
        """One chat completion through the ``role`` group."""
        result = await self._call(role, "chat", request)
        assert isinstance(result, ChatResult)
        return result

    async def score(self, role: str, request: ScoreRequest) -> ScoreResult:
        """Choice probabilities through the ``role`` group."""
        result = await self._call(role, "score", request)
        assert isinstance(result, ScoreResult)
        return result

    def _commit_budget(self, endpoints: list[EndpointState], request: Request, estimated: int) -> float:
        """Check the budget before a call and commit the call's worst-case cost (its estimated prompt, its full
        ``max_tokens``) until it is answered, so even thousands of calls in flight (a batch) cannot overshoot."""
        budget = self.config.budget_usd
        if budget is None:
            return 0.0
        output = request.max_tokens if isinstance(request, ChatRequest) else 1
        worst = max(e.config.cost(estimated - output, output) for e in endpoints)
        spent = self.accounting.cost_usd
        if spent + self._committed_usd + worst > budget:
            done = self.accounting.done
            raise BudgetExceeded(
                f"budget of ${budget:.2f} reached (spent ${spent:.4f}, ${self._committed_usd:.4f} more committed "
                f"to calls in flight; {done} items finished); no new calls are scheduled. Raise the budget "
                "(--max-cost or engine.budget_usd) and rerun: finished calls come back from the cache for free"
            )
        self._committed_usd += worst
        return worst

    async def _call(self, role: str, kind: Literal["chat", "score"], request: Any) -> ChatResult | ScoreResult:
        endpoints = self.group(role)
        normalized = request.to_key()
        keys: dict[str, str] = {}
        if self._cache is not None:
            for endpoint in endpoints:
                model = endpoint.config.cache_identity
                if model not in keys:
                    keys[model] = request_key(model, normalized)
                    hit = self._cache.get(keys[model])
                    if hit is not None:
                        self.accounting.cache_hits += 1
                        self.accounting.endpoint(hit.get("endpoint") or endpoint.name).cache_hits += 1
                        return _from_cache(kind, hit)
        assert self._global is not None, "use the engine inside 'async with Engine(...)'"
        estimated = estimate_tokens(request)
        committed = self._commit_budget(endpoints, request, estimated)
        batch = all(e.traits.queues_calls for e in endpoints)
        limiter = nullcontext() if _BOUNDED.get() or batch else self._global  # queued calls only wait in a queue
        try:
            async with limiter:
                try:
                    # Fast path: most calls succeed first time and skip tenacity's per-attempt bookkeeping.
                    result, state = await self._attempt(role, endpoints, kind, request, estimated, False)
                except (RateLimited, TransientError) as first:
                    if batch:  # a queueing backend retries inside (resubmission); a rerun resumes its batches
                        raise
                    result, state = await self._retry_after(first, role, endpoints, kind, request, estimated)
        finally:
            self._committed_usd -= committed
        if self._cache is not None:
            model = state.config.cache_identity
            key = keys.get(model) or request_key(model, normalized)
            await self._cache.store(key, kind=kind, model=model, result=_to_cache(result))
        return result

    async def _retry_after(
        self, first: BackendError, role: str, endpoints: list[EndpointState], kind: str, request: Any, estimated: int
    ) -> tuple[ChatResult | ScoreResult, EndpointState]:
        """Retry a call whose first attempt failed, under the tenacity policy: tenacity counts that failure as
        attempt 1 (:func:`retry_after_first`), so ``max_attempts``, ``max_time_s``, the backoff and ``Retry-After``
        apply as to any call."""
        last = first

        async def again() -> tuple[ChatResult | ScoreResult, EndpointState]:
            nonlocal last
            try:  # a retry goes to another endpoint than the one that just failed, when one can take it
                return await self._attempt(role, endpoints, kind, request, estimated, True, avoid=last.endpoint)
            except BackendError as exc:
                last = exc
                raise

        return await retry_after_first(self._retry, first, again)

    async def _attempt(
        self, role: str, endpoints: list[EndpointState], kind: str, request: Any, estimated: int, is_retry: bool,
        avoid: str = "",
    ) -> tuple[ChatResult | ScoreResult, EndpointState]:
        try:
            state = await choose_endpoint(endpoints, role=role, retry=self.config.retry, breaker=self.config.breaker,
                                          avoid=avoid, sleep=self._sleep, clock=self._clock)
        except EndpointDown as exc:  # every call waiting on these endpoints stops with the first reason: one line
            raise self._stops.setdefault(frozenset(e.name for e in endpoints), exc) from None
        probe = state.probing
        stats = self.accounting.endpoint(state.name)
        if is_retry:
            stats.retries += 1
        state.inflight += 1
        try:
            async with state.capacity:
                await state.limits.acquire(estimated)
                try:
                    result: ChatResult | ScoreResult
                    if kind == "chat":
                        result = await state.backend.chat(request)
                    else:
                        result = await state.backend.score(request)
                except BackendError as exc:
                    state.limits.answered()
                    stats.failures += 1
                    if isinstance(exc, RateLimited):
                        stats.rate_limited += 1
                        fallback = min(self.config.retry.max_wait_s, self.config.retry.initial_s * 4)
                        wait = _learned_wait(exc)
                        if wait is not None and state.rate_limited_until(wait, self.config.retry):
                            state.limits.pause(wait)  # a quota's horizon says nothing of the rate: keep it
                            self.accounting.waiting[state.name] = time.time() + wait
                        else:
                            state.limits.on_rate_limited(wait, max(fallback, 0.5), exc.rate_limit)
                        state.record_success()  # an answer: the endpoint is up, only busy
                    elif isinstance(exc, TransientError):
                        state.record_failure(exc)
                        key = f"{state.name}:{type(exc).__name__}:{exc.status}"
                        if state.down_cause is None:
                            self.notices.warn(key, f"call failed: {exc}")
                        else:  # the line saying it is down says why; its failing probes are no news
                            self.notices.settle(key)
                    else:
                        state.record_success()  # an answer (a 4xx): the endpoint is up
                    log.debug("call failed on %s: %s", state.name, exc)
                    raise
        finally:
            state.inflight -= 1
            if probe and state.probing:  # a probe cancelled before its answer: let another call probe
                state.probing = False
        state.limits.answered()
        state.record_success()
        if self._stops:
            self._stops = {names: stop for names, stop in self._stops.items() if state.name not in names}
        usage = result.usage
        state.limits.on_success(result.rate_limit, estimated, usage.total_tokens, state.inflight)
        stats.calls += 1
        stats.prompt_tokens += usage.prompt_tokens
        stats.completion_tokens += usage.completion_tokens
        stats.cost_usd += state.config.cost(usage.prompt_tokens, usage.completion_tokens)
        stats.add_latency(result.latency_s)
        if self._ledger is not None and self._clock() - self._ledger_saved >= 0.2:
            self._save_ledger()
        return result, state

    async def run_batch(
        self,
        items: Iterable[T] | AsyncIterable[T],
        call: Callable[[T], Awaitable[R]],
        *,
        on_result: Callable[[T, R | CaiError], Awaitable[None] | None],
        total: int | None = None,
        concurrency: int | None = None,
    ) -> BatchReport[T]:
        """Run ``call`` over ``items`` with a fixed pool of workers (memory stays bounded however many
        items there are). Each outcome, a result or the ``CaiError`` that ended it, goes to ``on_result``
        as soon as it is known. A reached budget stops scheduling and is reported in ``stopped``."""
        workers = concurrency or self.config.max_concurrency
        report: BatchReport[T] = BatchReport()
        # progress counts across batches: this batch adds its items to what earlier batches finished
        self.accounting.total = None if total is None else self.accounting.done + self.accounting.failed + total
        stop = anyio.Event()
        fatal: list[ConfigError | RunStopped] = []
        # Workers pull the next item themselves when free: no producer task, no hand-over per item, and never
        # more items out of the iterable than workers. A sync iterator needs no lock (next() does not yield).
        lock = anyio.Lock()
        source: Iterator[T] | AsyncIterator[T] = aiter(items) if isinstance(items, AsyncIterable) else iter(items)

        async def pull() -> tuple[bool, T | None]:
            if isinstance(source, AsyncIterator):
                async with lock:
                    try:
                        return True, await anext(source)
                    except StopAsyncIteration:
                        return False, None
            for item in source:
                return True, item
            return False, None

        async def work() -> None:
            if workers <= self.config.max_concurrency:
                _BOUNDED.set(True)  # the worker pool already bounds concurrency: skip the global limiter
            while not stop.is_set():
                await anyio.lowlevel.checkpoint()  # cache hits return without yielding: let others run
                more, got = await pull()
                if not more or stop.is_set():
                    return
                item = cast(T, got)
                report.submitted += 1
                outcome: R | CaiError
                try:
                    outcome = await call(item)
                except BudgetExceeded as exc:
                    outcome = exc
                    report.stopped = str(exc)
                    stop.set()
                except (ConfigError, RunStopped) as exc:  # wrong for every item (no Batch API, group down): stop
                    fatal.append(exc)
                    stop.set()
                    tg.cancel_scope.cancel()
                    return
                except CaiError as exc:
                    outcome = exc
                report.count(outcome, self.accounting)
                maybe = on_result(item, outcome)
                if inspect.isawaitable(maybe):
                    await maybe

        async with anyio.create_task_group() as tg:
            for _ in range(workers):
                tg.start_soon(work)
        if fatal:
            raise fatal[0]
        return report

    def summary(self) -> dict[str, Any]:
        """Accounting snapshot plus learned limits per endpoint."""
        snap = self.accounting.snapshot()
        if self._ledger is not None:
            self._save_ledger()
            snap["run_total"] = self._ledger.totals()
        snap["limits"] = {
            name: {"rpm": state.limits.rpm, "tpm": state.limits.tpm} for name, state in self._endpoints.items()
        }
        for name, state in self._endpoints.items():  # each backend's own summary, in the section it names
            summary = summary_of(state.backend)
            if summary is not None:
                snap.setdefault(state.traits.summary_key, {})[name] = summary
        return snap
