"""``executor: ray``: a stage's items run as a Ray Data pipeline over engine actors; rows come back to the driver,
which writes them as this project's Parquet shards (same schema, same resume by id).

Each actor owns one :class:`~cai_async.engine.Engine` on an event loop of its own (an anyio blocking portal) and
runs the items of a batch concurrently through the stage's own per-item code (``ChainRunner.run``,
``Labeller.label``, ``sample_responses``, the evaluation's sampler), rebound to its engine. Endpoint limits hold
in aggregate: each of N actors gets 1/N of every endpoint's RPM, TPM (configured, or learned from the headers)
and budget. A killed actor's batches are redone by Ray on another actor; calls its engine had finished are
answered from the shared request cache, so only the calls in flight at the kill are paid twice."""

from __future__ import annotations

import copy
import functools
import inspect
import json
import logging
import os
import pickle
import socket
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.from_thread
import anyio.to_thread
from anyio.from_thread import BlockingPortal, start_blocking_portal

from backends.errors import CaiError, ConfigError, RunStopped
from cai_async.engine import BatchReport, Engine, EngineConfig
from cai_async.engine.limits import EndpointLimits, TokenBucket
from cai_async.scale.config import RayConfig

__all__ = ["ACTORS_FILE", "RayRows", "actor_engine_config", "check_online", "ray_session"]

T = TypeVar("T")
R = TypeVar("R")

ACTORS_FILE = "ray_actors.jsonl"
"""In the run directory: one line per engine actor started (pid, host, time), to find and watch them."""


def check_online(config: EngineConfig) -> None:
    """Refuse endpoints in Batch API mode: their rounds are collected by one driver, not spread over actors."""
    batch = [e.name for group in config.groups.values() for e in group if e.mode == "batch"]
    if batch:
        raise ConfigError(
            f"executor: ray runs online endpoints only; {', '.join(sorted(set(batch)))} use mode: batch, whose "
            "rounds stay on one driver: use executor: local (drop --ray) for Batch API runs"
        )


def actor_engine_config(config: EngineConfig, ray: RayConfig) -> EngineConfig:
    """The engine configuration of one of ``ray.actors`` actors: 1/N of every configured RPM, TPM and budget,
    and no progress display."""
    share = 1.0 / ray.actors
    data = config.model_copy(deep=True)
    for group in data.groups.values():
        for endpoint in group:
            endpoint.rpm = endpoint.rpm * share if endpoint.rpm else None
            endpoint.tpm = endpoint.tpm * share if endpoint.tpm else None
    data.budget_usd = data.budget_usd * share if data.budget_usd else None
    data.progress = "off"
    return data


def _node_cache(config: EngineConfig, run_dir: Path) -> EngineConfig:
    """``ray.cache: node``: the request cache of the machine this actor runs on."""
    if not config.cache.enabled or config.cache.path is not None:
        return config
    cache = config.cache.model_copy(update={"path": str(run_dir / f"cache-{socket.gethostname()}.sqlite")})
    return config.model_copy(update={"cache": cache})


class _ShareOfLimits(EndpointLimits):
    """An endpoint's limits as one of N actors sees them: limits learned from ``x-ratelimit-*`` headers (which
    state the whole endpoint's) are divided by N, like configured ones."""

    share = 1.0

    def _learned(self, bucket: TokenBucket | None, limit: float, remaining: int | None) -> TokenBucket:
        mine = None if remaining is None else int(remaining * self.share)
        return super()._learned(bucket, limit * self.share, mine)


def _share_learned_limits(engine: Engine, config: EngineConfig, share: float) -> None:
    for role in config.groups:
        for state in engine.group(role):
            if isinstance(state.limits, _ShareOfLimits) or not state.limits.learn:
                continue
            limits = _ShareOfLimits(rpm=None, tpm=None, learn=True, slow_start=state.config.slow_start)
            limits.share = share
            state.limits = limits


class _EngineSlot:
    """Stands for the engine in a per-item function sent to an actor; the actor puts its own engine there."""


class _Worker:
    """What an actor needs to run a stage's items: the engine configuration and the per-item function, detached
    from the driver's engine — a method of an object holding it (``ChainRunner.run``, ``Labeller.label``), or a
    ``functools.partial`` given it (``sample_responses``)."""

    def __init__(self, call: Callable[[Any], Awaitable[Any]], config: EngineConfig, run_dir: Path,
                 share: float, concurrency: int, *, node_cache: bool = False) -> None:
        self.partial: tuple[Callable[..., Awaitable[Any]], tuple[Any, ...], dict[str, Any]] | None = None
        self.owner: Any = None
        if isinstance(call, functools.partial):
            args = tuple(_EngineSlot if isinstance(arg, Engine) else arg for arg in call.args)
            if _EngineSlot not in args:
                raise TypeError("no engine among the partial's arguments")
            self.partial, self.method = (call.func, args, dict(call.keywords)), call.func.__name__
        else:
            owner = getattr(call, "__self__", None)
            if owner is None or not isinstance(getattr(owner, "engine", None), Engine):
                raise TypeError("not a method of an object holding the engine")
            self.owner = copy.copy(owner)
            self.owner.engine = None
            self.method = call.__name__
        self.config = config
        self.run_dir = run_dir
        self.share = share
        self.concurrency = concurrency
        self.node_cache = node_cache

    def bind(self, engine: Engine) -> Callable[[Any], Awaitable[Any]]:
        """The per-item function on ``engine``."""
        if self.partial is not None:
            func, args, keywords = self.partial
            return functools.partial(func, *(engine if arg is _EngineSlot else arg for arg in args), **keywords)
        owner = copy.copy(self.owner)
        owner.engine = engine
        bound: Callable[[Any], Awaitable[Any]] = getattr(owner, self.method)
        return bound


def _dump_error(error: CaiError) -> bytes:
    """``error`` pickled for the driver; one that does not survive pickling goes as a plain ``CaiError``."""
    try:
        blob = pickle.dumps(error)
        pickle.loads(blob)
        return blob
    except Exception:
        return pickle.dumps(CaiError(f"{type(error).__name__}: {error}"))


class _EngineActor:
    """A Ray Data actor: one engine on its own event loop; ``__call__`` runs a batch of pickled items."""

    def __init__(self, worker: _Worker) -> None:
        self._stack = ExitStack()
        self._portal: BlockingPortal = self._stack.enter_context(start_blocking_portal("asyncio"))
        config = _node_cache(worker.config, worker.run_dir) if worker.node_cache else worker.config
        self._engine = Engine(config, run_dir=worker.run_dir)
        self._portal.call(self._engine.__aenter__)
        _share_learned_limits(self._engine, worker.config, worker.share)
        self._call = worker.bind(self._engine)
        self._concurrency = worker.concurrency
        line = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "method": worker.method}
        with (worker.run_dir / ACTORS_FILE).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        items = [pickle.loads(blob) for blob in batch["item"]]
        return self._portal.call(self._run, [int(i) for i in batch["index"]], items)

    async def _run(self, indices: list[int], items: list[Any]) -> dict[str, list[Any]]:
        """Each item's outcome by its index: the result pickled, or the ``CaiError`` that ended it; items the
        budget left unstarted are not in it, and ``stopped`` says why (as ``Engine.run_batch`` reports)."""
        out: dict[str, list[Any]] = {"index": [], "result": [], "error": [], "stopped": []}

        async def call(position: int) -> Any:
            return await self._call(items[position])

        def on_result(position: int, outcome: Any) -> None:
            out["index"].append(indices[position])
            failed = isinstance(outcome, CaiError)
            out["result"].append(b"" if failed else pickle.dumps(outcome))
            out["error"].append(_dump_error(outcome) if failed else b"")

        report = await self._engine.run_batch(range(len(items)), call, on_result=on_result, total=len(items),
                                              concurrency=min(self._concurrency, len(items)))
        if report.stopped and not out["index"]:
            out.update(index=[-1], result=[b""], error=[b""])
        out["stopped"] = [report.stopped or ""] * len(out["index"])
        return out

    def __del__(self) -> None:
        """Ray Data's graceful shutdown: close the engine (the ledger marks this process finished)."""
        try:
            self._portal.call(self._engine.aclose)
            self._stack.close()
        except Exception:  # the loop may be gone already at interpreter exit
            pass


@contextmanager
def ray_session(config: RayConfig) -> Iterator[None]:
    """Connect to ``config.address``, or start a local cluster (stopped at exit); reuse one already joined."""
    import ray

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its per-dataset progress lines; the engine has its own
    if ray.is_initialized():
        yield
        return
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if config.runtime_env:
        options["runtime_env"] = config.runtime_env
    if config.address is None:
        options["num_cpus"] = config.num_cpus or int(config.actors * config.actor_cpus) + 1
    try:
        ray.init(address=config.address, **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"ray: cannot join the cluster at {config.address or 'a new local cluster'} ({exc}); "
                          "check ray.address") from None
    try:
        yield
    finally:
        ray.shutdown()


def _unwrap(exc: BaseException) -> BaseException:
    """The ``CaiError`` a failed Ray task raised in an actor (a ``ConfigError``, a group down), else ``exc``."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, CaiError):
            return cause
        cause = getattr(cause, "cause", None) or cause.__cause__
    return exc


class RayRows:
    """The stages' :class:`~cai_async.stages.unit.ItemExecutor` under ``executor: ray`` (in the stage context, in
    place of ``engine``, the driver's engine): the items run on Ray engine actors; each outcome comes back to
    ``on_result`` here, in the driver, which writes the rows. Per-item functions it cannot send to an actor
    (closures over the engine) run on the driver's engine."""

    def __init__(self, ray: RayConfig, engine: Engine, run_dir: Path) -> None:
        self.ray = ray
        self.engine = engine
        self.engine_config = actor_engine_config(engine.config, ray)
        self.run_dir = run_dir
        self.local_fallbacks: list[str] = []

    async def run_batch(
        self,
        items: Iterable[T] | AsyncIterable[T],
        call: Callable[[T], Awaitable[R]],
        *,
        on_result: Callable[[T, R | CaiError], Awaitable[None] | None],
        total: int | None = None,
        concurrency: int | None = None,
    ) -> BatchReport[T]:
        """The items read whole in the driver (a stage may stream them), run as a Ray Data pipeline."""
        engine = self.engine
        try:
            worker = _Worker(call, self.engine_config, self.run_dir, 1.0 / self.ray.actors,
                             concurrency or self.engine_config.max_concurrency, node_cache=self.ray.cache == "node")
        except TypeError:
            self.local_fallbacks.append(getattr(call, "__qualname__", repr(call)))
            return await engine.run_batch(items, call, on_result=on_result, total=total, concurrency=concurrency)
        whole = [item async for item in items] if isinstance(items, AsyncIterable) else list(items)
        report: BatchReport[T] = BatchReport()
        engine.accounting.total = engine.accounting.done + engine.accounting.failed + len(whole)
        if whole:
            await anyio.to_thread.run_sync(self._drive, engine, whole, worker, on_result, report)
        return report

    def _drive(self, engine: Engine, items: list[Any], worker: _Worker,
               on_result: Callable[[Any, Any], Awaitable[None] | None], report: BatchReport[Any]) -> None:
        import ray.data

        (self.run_dir / ACTORS_FILE).touch()
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        blocks = max(1, -(-len(items) // self.ray.batch_size))
        dataset = ray.data.from_items([{"index": i, "item": pickle.dumps(item)} for i, item in enumerate(items)],
                                      override_num_blocks=blocks)
        mapped = dataset.map_batches(
            _EngineActor, fn_constructor_args=(worker,), batch_size=self.ray.batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=min(self.ray.actors, blocks),  # no idle actors (their shares
                                               # of the limits stay unused: a few items need no more)
                                               max_tasks_in_flight_per_actor=self.ray.batches_per_actor,
                                               max_concurrent_calls_per_actor=self.ray.batches_per_actor),
            num_cpus=self.ray.actor_cpus,
        )
        seen: set[int] = set()
        try:
            for batch in mapped.iter_batches(batch_format="numpy", batch_size=None):
                for index, result, error, stopped in zip(batch["index"], batch["result"], batch["error"],
                                                         batch["stopped"], strict=True):
                    report.stopped = report.stopped or str(stopped) or None
                    if index < 0 or int(index) in seen:  # a batch the budget stopped; an item given twice
                        continue
                    seen.add(int(index))
                    report.submitted += 1
                    outcome = pickle.loads(error) if error else pickle.loads(result)
                    report.count(outcome, engine.accounting)
                    maybe = on_result(items[int(index)], outcome)
                    if inspect.isawaitable(maybe):
                        anyio.from_thread.run(_awaited, maybe)
        except (ConfigError, RunStopped):
            raise
        except Exception as exc:
            found = _unwrap(exc)
            if found is exc:
                raise
            raise found from None


async def _awaited(awaitable: Awaitable[None]) -> None:
    await awaitable
