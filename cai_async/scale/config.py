"""Options of ``executor: ray`` (recipe key ``ray``): where the cluster is, how many engine actors, how work and
the request cache are shared."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from backends.strict import StrictModel

__all__ = ["Executor", "RayConfig"]

Executor = Literal["local", "ray"]
"""Where a recipe's data stages run: this process's engine, or Ray Data pipelines over engine actors."""


class RayConfig(StrictModel):
    """How the data stages run on Ray (recipe key ``ray``, used with ``executor: ray``)."""

    address: str | None = None
    """A running cluster (``auto``, ``HOST:6379``, ``ray://HOST:10001``); unset: a local cluster is started for
    the run and shut down after it."""
    actors: int = Field(default=2, ge=1)
    """Engine actors: each owns one engine (one in-process model for local backends) and an equal share of every
    endpoint's RPM, TPM and budget, so together they never exceed the limits."""
    actor_cpus: float = Field(default=1.0, gt=0)
    """CPUs Ray reserves for each actor."""
    num_cpus: int | None = Field(default=None, ge=1)
    """Local cluster only: the CPUs it offers (default: enough for the actors plus one for reading prompts)."""
    batch_size: int = Field(default=64, ge=1)
    """Items (chains, pairs, samples) handed to an actor at a time; a killed actor's unfinished batches are redone."""
    batches_per_actor: int = Field(default=2, ge=1)
    """Batches one actor works on at once (its engine runs their items concurrently)."""
    cache: Literal["run", "node"] = "run"
    """``run``: every actor uses the run's ``cache.sqlite`` (SQLite WAL: safe across processes of one machine);
    ``node``: one cache file per machine (``cache-HOST.sqlite``), for a run directory on a shared file system,
    where SQLite's locks do not hold across machines."""
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    """Passed to ``ray.init`` (e.g. ``{"pip": ["cai-async[scale]"]}`` for a cluster without cai-async)."""
