"""Beyond one process: the data stages on Ray Data (``executor: ray``), each actor owning one engine."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from cai_async.engine import Engine
from cai_async.scale.config import Executor, RayConfig

if TYPE_CHECKING:
    from cai_async.stages.unit import ItemExecutor

__all__ = ["Executor", "RayConfig", "executor_scope"]


@asynccontextmanager
async def executor_scope(
    executor: Executor, ray: RayConfig, engine: Engine, run_dir: Path
) -> AsyncIterator[ItemExecutor]:
    """The executor of the stages' items (for :attr:`StageContext.executor
    <cai_async.stages.unit.StageContext.executor>`) while open: ``engine`` itself for ``local``; for ``ray`` a
    cluster is joined (or a local one started) and every stage's per-item work goes to engine actors."""
    if executor == "local":
        yield engine
        return
    from cai_async.scale.ray_executor import RayRows, check_online, ray_session

    check_online(engine.config)
    with ray_session(ray):
        yield RayRows(ray, engine, run_dir)
