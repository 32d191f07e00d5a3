"""``executor: ray``: a stage's items run as a Ray Data pipeline over engine actors; rows come back to the driver,
which writes them as this project's Parquet shards (same schema, same resume by id).

Each actor owns one :class:`~cai_async.engine.Engine` on an event loop of its own (an anyio blocking portal) and
runs the items of a batch concurrently through the stage's own per-item code (``ChainRunner.run``,
``Labeller.label``, the evaluation's sampler), rebound to its engine. Endpoint limits hold in aggregate: each of
N actors gets 1/N of every endpoint's RPM, TPM (configured, or learned from the headers) and budget. A killed
actor's batches are redone by Ray on another actor; calls its engine had finished are answered from the shared
request cache, so only the calls in flight at the kill are paid twice."""

from __future__ import annotations

import copy
import json
import logging
import os
import pickle
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from anyio.from_thread import BlockingPortal, start_blocking_portal

from backends.errors import CaiError, ConfigError, RunStopped
from cai_async.engine import Engine, EngineConfig
from cai_async.engine.limits import EndpointLimits, TokenBucket
from cai_async.scale.config import RayConfig
from cai_async.stages.common import ROW_EXECUTOR, StageReport, write_rows
from cai_async.store import ShardWriter

__all__ = ["ACTORS_FILE", "RayRows", "actor_engine_config", "check_online", "ray_session"]

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


def actor_engine_config(config: EngineConfig, ray: RayConfig, run_dir: Path) -> EngineConfig:
    """The engine configuration of one of ``ray.actors`` actors: 1/N of every configured RPM, TPM and budget,
    no progress display, and the request cache ``ray.cache`` says."""
    share = 1.0 / ray.actors
    data = config.model_copy(deep=True)
    for group in data.groups.values():
        for endpoint in group:
            endpoint.rpm = endpoint.rpm * share if endpoint.rpm else None
            endpoint.tpm = endpoint.tpm * share if endpoint.tpm else None
    data.budget_usd = data.budget_usd * share if data.budget_usd else None
    data.progress = "off"
    if data.cache.enabled and data.cache.path is None and ray.cache == "node":
        data.cache.path = str(run_dir / f"cache-{socket.gethostname()}.sqlite")
    return data


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


class _Worker:
    """What an actor needs to run a stage's items: the engine configuration and the per-item method, detached
    from the driver's engine (``owner.engine`` is set to the actor's own)."""

    def __init__(self, make_row: Callable[[Any], Awaitable[dict[str, Any]]], config: EngineConfig, run_dir: Path,
                 share: float, concurrency: int) -> None:
        owner = getattr(make_row, "__self__", None)
        if owner is None or not isinstance(getattr(owner, "engine", None), Engine):
            raise TypeError("not a method of an object holding the engine")
        self.owner = copy.copy(owner)
        self.owner.engine = None
        self.method = make_row.__name__
        self.config = config
        self.run_dir = run_dir
        self.share = share
        self.concurrency = concurrency


class _EngineActor:
    """A Ray Data actor: one engine on its own event loop; ``__call__`` runs a batch of pickled items."""

    def __init__(self, worker: _Worker) -> None:
        self._stack = ExitStack()
        self._portal: BlockingPortal = self._stack.enter_context(start_blocking_portal("asyncio"))
        self._engine = Engine(worker.config, run_dir=worker.run_dir)
        self._portal.call(self._engine.__aenter__)
        _share_learned_limits(self._engine, worker.config, worker.share)
        owner = copy.copy(worker.owner)
        owner.engine = self._engine
        self._make_row: Callable[[Any], Awaitable[dict[str, Any]]] = getattr(owner, worker.method)
        self._concurrency = worker.concurrency
        line = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "method": worker.method}
        with (worker.run_dir / ACTORS_FILE).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        items = [pickle.loads(blob) for blob in batch["item"]]
        return self._portal.call(self._run, items)

    async def _run(self, items: list[Any]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"id": [], "row": [], "failure": []}

        def on_result(item: Any, outcome: dict[str, Any] | CaiError) -> None:
            out["id"].append(item.id)
            if isinstance(outcome, CaiError):
                out["row"].append(b"")
                out["failure"].append(json.dumps({"id": item.id, "error": f"{type(outcome).__name__}: {outcome}",
                                                  "class": type(outcome).__name__}))
            else:
                out["row"].append(pickle.dumps(outcome))
                out["failure"].append("")

        report = await self._engine.run_batch(items, self._make_row, on_result=on_result, total=len(items),
                                              concurrency=min(self._concurrency, len(items)))
        for item in items[len(out["id"]):] if report.stopped else ():  # never started: the budget was reached
            out["id"].append(item.id)
            out["row"].append(b"")
            out["failure"].append(json.dumps({"id": item.id, "error": report.stopped, "class": "stopped"}))
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
    """A drop-in for :func:`~cai_async.stages.common.write_rows` that runs the items on Ray actors and writes
    their rows here. Per-item functions it cannot send to an actor (closures over the engine) run locally."""

    def __init__(self, ray: RayConfig, engine_config: EngineConfig, run_dir: Path) -> None:
        self.ray = ray
        self.engine_config = actor_engine_config(engine_config, ray, run_dir)
        self.run_dir = run_dir
        self.local_fallbacks: list[str] = []

    async def __call__(
        self,
        engine: Engine,
        items: Sequence[Any],
        make_row: Callable[[Any], Awaitable[dict[str, Any]]],
        writer: ShardWriter,
        report: StageReport,
        *,
        count: Callable[[dict[str, Any]], None] = lambda row: None,
        concurrency: int | None = None,
    ) -> None:
        try:
            worker = _Worker(make_row, self.engine_config, self.run_dir, 1.0 / self.ray.actors,
                             concurrency or self.engine_config.max_concurrency)
        except TypeError:
            self.local_fallbacks.append(getattr(make_row, "__qualname__", repr(make_row)))
            token = ROW_EXECUTOR.set(None)
            try:
                await write_rows(engine, items, make_row, writer, report, count=count, concurrency=concurrency)
            finally:
                ROW_EXECUTOR.reset(token)
            return
        import anyio

        start = time.perf_counter()
        engine.accounting.total = engine.accounting.done + engine.accounting.failed + len(items)
        try:
            if items:
                await anyio.to_thread.run_sync(self._drive, engine, items, worker, writer, report, count)
        finally:
            writer.flush()
            report.written = writer.written
            report.seconds = time.perf_counter() - start

    def _drive(self, engine: Engine, items: Sequence[Any], worker: _Worker, writer: ShardWriter,
               report: StageReport, count: Callable[[dict[str, Any]], None]) -> None:
        import ray.data

        (self.run_dir / ACTORS_FILE).touch()
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        dataset = ray.data.from_items([{"item": pickle.dumps(item)} for item in items],
                                      override_num_blocks=max(1, -(-len(items) // self.ray.batch_size)))
        mapped = dataset.map_batches(
            _EngineActor, fn_constructor_args=(worker,), batch_size=self.ray.batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=self.ray.actors,
                                               max_tasks_in_flight_per_actor=self.ray.batches_per_actor,
                                               max_concurrent_calls_per_actor=self.ray.batches_per_actor),
            num_cpus=self.ray.actor_cpus,
        )
        seen: set[str] = set()
        try:
            for batch in mapped.iter_batches(batch_format="numpy", batch_size=None):
                for item_id, blob, failure in zip(batch["id"], batch["row"], batch["failure"], strict=True):
                    if str(item_id) in seen:  # an item given twice: the first answer stands
                        continue
                    seen.add(str(item_id))
                    if failure:
                        record = json.loads(failure)
                        if record.get("class") == "stopped":
                            report.stopped = record["error"]
                        report.failed += 1
                        report.failures.append(record)
                        engine.accounting.failed += 1
                        continue
                    row = pickle.loads(blob)
                    if row.get("status", "ok") != "ok":
                        report.failures.append({"id": str(item_id), "error": str(row.get("error")),
                                                "class": str(row.get("error_class") or "")})
                    count(row)
                    writer.add(row)
                    engine.accounting.done += 1
        except (ConfigError, RunStopped):
            raise
        except Exception as exc:
            found = _unwrap(exc)
            if found is exc:
                raise
            raise found from None
