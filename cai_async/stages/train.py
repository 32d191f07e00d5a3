"""Training as a stage (recipe key ``train``): each training stage the recipe lists (sft, reward, dpo, rl) runs
with TRL in a worker thread, on what the run exported; no endpoint is called. Its command, ``cai train STAGE``,
trains one of them outside the recipe runner (``cai_async/cli/app.py``)."""

from __future__ import annotations

import functools
from typing import Any

import anyio

from cai_async.stages.unit import StageContext, StageUnit
from cai_async.train.config import TrainConfig

__all__ = ["STAGE", "TrainStage"]


class TrainStage(StageUnit[TrainConfig]):
    """The training stage: one summary entry ``train/<stage>`` per training stage."""

    name = "train"
    config_type = TrainConfig
    session = None

    def entries(self, config: TrainConfig) -> list[str]:
        """``train/sft``, ``train/dpo``, … in the order the recipe lists them."""
        return [f"train/{stage}" for stage in config.stages]

    async def run(self, context: StageContext, config: TrainConfig, entry: str) -> dict[str, Any]:
        """Train one stage in a worker thread; its report (steps, losses, artefacts)."""
        from cai_async.train.run import run_training

        stage = entry.removeprefix("train/")
        result: dict[str, Any] = await anyio.to_thread.run_sync(functools.partial(
            run_training, stage, config, context.run_dir, engine_config=context.recipe.engine))
        return result


STAGE = TrainStage()
"""The registered unit."""
