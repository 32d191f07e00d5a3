"""Beyond one process: the data stages on Ray Data (``executor: ray``), each actor owning one engine."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from cai_async.engine import EngineConfig
from cai_async.scale.config import Executor, RayConfig

__all__ = ["Executor", "RayConfig", "executor_scope"]


@asynccontextmanager
async def executor_scope(
    executor: Executor, ray: RayConfig, engine: EngineConfig, run_dir: Path
) -> AsyncIterator[None]:
    """While open, the stages' items run on ``executor``: nothing changes for ``local``; for ``ray`` a cluster is
    joined (or a local one started) and every stage's per-item work goes to engine actors."""
    if executor == "local":
        yield
        return
    from cai_async.scale.ray_executor import RayRows, check_online, ray_session
    from cai_async.stages.common import ITEM_EXECUTOR

    check_online(engine)
    with ray_session(ray):
        token = ITEM_EXECUTOR.set(RayRows(ray, engine, run_dir))
        try:
            yield
        finally:
            ITEM_EXECUTOR.reset(token)
