"""A constitutional reward for online RL: each completion is put to the engine's ``judge`` group as a
multiple-choice question per comparison principle ("Judged by this principle, is the response a good one?
(A) yes (B) no"), and the reward is the mean P(A). TRL's GRPO/RLOO trainers call it (async) on their own
event loop; the engine is opened there on first use and its request cache makes repeated judgments free."""

from __future__ import annotations

import random
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
from anyio.from_thread import BlockingPortal

from backends.errors import ConfigError
from cai_async.constitution_io import load_comparison_set
from cai_async.engine import JUDGE, Engine, EngineConfig
from cai_async.judging import judge_response

__all__ = ["ConstitutionalReward", "SyncReward"]


class ConstitutionalReward:
    """Async reward function ``(prompts, completions, **kwargs) -> list[float]`` in [0, 1]."""

    __name__ = "constitutional_reward"

    def __init__(self, engine_config: EngineConfig, run_dir: str | Path, *, principles: str = "harmless",
                 ensemble: int = 2, role: str = JUDGE, seed: int = 0) -> None:
        batched = [e.name for e in engine_config.group(role) if e.mode == "batch"]
        if batched:
            raise ConfigError(
                f"online RL needs its rewards now, not in a batch: the {role} endpoint(s) {', '.join(batched)} are in "
                "mode batch; use mode online for the critic (batch mode suits the data stages)"
            )
        self.engine_config = engine_config
        self.run_dir = Path(run_dir)
        self.principles = load_comparison_set(principles)
        self.ensemble = min(ensemble, len(self.principles.principles))
        self.role = role
        self.seed = seed
        self._stack: AsyncExitStack | None = None
        self._engine: Engine | None = None
        self.calls = 0

    async def _ready(self) -> Engine:
        if self._engine is None:
            self._stack = AsyncExitStack()
            self._engine = await self._stack.enter_async_context(Engine(self.engine_config, run_dir=self.run_dir))
        return self._engine

    async def _one(self, engine: Engine, prompt: Any, completion: Any, index: int) -> float:
        rng = random.Random(f"{self.seed}:{index}:{str(completion)[:200]}")
        scores = await judge_response(engine, self.role, self.principles, prompt, completion, ensemble=self.ensemble,
                                      rng=rng)  # abstentions are left out of the mean
        self.calls += len(scores)
        return sum(scores) / len(scores) if scores else 0.5

    async def score(self, prompt: Any, completion: Any) -> float:
        """The reward of one completion, with principles drawn from the seed and the completion alone (so the
        same completion always gets the same questions, and a cache keyed by it stays exact)."""
        return await self._one(await self._ready(), prompt, completion, 0)

    async def __call__(self, prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
        engine = await self._ready()
        rewards = [0.5] * len(completions)

        async def judge(index: int) -> None:
            rewards[index] = await self._one(engine, prompts[index], completions[index], index)

        async with anyio.create_task_group() as tg:
            for index in range(len(completions)):
                tg.start_soon(judge, index)
        return rewards

    @property
    def opened(self) -> bool:
        """Whether the engine was opened (on the trainer's event loop)."""
        return self._engine is not None

    async def aclose(self) -> None:
        """Close the engine (on the loop that opened it)."""
        if self._stack is not None:
            await self._stack.aclose()
            self._stack = self._engine = None


class SyncReward:
    """A :class:`ConstitutionalReward` for trainers that call reward functions synchronously (TRL's experimental
    online DPO): each call runs on a blocking portal's event loop, where the engine stays open between calls."""

    __name__ = "constitutional_reward"

    def __init__(self, reward: ConstitutionalReward, portal: BlockingPortal) -> None:
        self.reward = reward
        self._portal = portal

    def __call__(self, prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
        return self._portal.call(self.reward, prompts, completions)
