"""Training as a stage (recipe key ``train``): each training stage the recipe lists (sft, reward, dpo, rl) runs
with TRL in a worker thread, on what the run exported; no endpoint is called. Its command, ``cai train STAGE``,
trains one of them outside the recipe runner (``cai_async/cli/app.py``). What each training stage reads (an
export, a trained reward model, OpenRLHF's prompts) is declared, so a recipe whose training cannot run stops
before the data stages spend anything."""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from cai_async.stages.unit import StageContext, StageInput, StageResult, StageUnit
from cai_async.train.config import TrainConfig

__all__ = ["STAGE", "TrainReport", "TrainStage"]

TRAINING_MODULES = ("torch", "transformers", "trl", "peft", "datasets")
"""What TRL training imports (the ``train`` extra)."""

_DATA = {"sft": ("sft", "train.sft_data", "an sl section"),
         "reward": ("reward", "train.reward_data", "a label section"),
         "dpo": ("dpo", "train.dpo_data", "a label section"), "rl": ("dpo", "train.dpo_data", "a label section")}
"""Training stage → (the export it reads, the key that replaces it, the recipe section that writes it)."""


def _missing_modules(names: tuple[str, ...]) -> list[str]:
    return [name for name in names if importlib.util.find_spec(name) is None]


def _has_reward_model(folder: Path) -> bool:
    """What :func:`~cai_async.train.models.trained_reward_model` accepts: a ``merged`` folder or the folder itself
    with ``config.json``."""
    return (folder / "merged" / "config.json").is_file() or (folder / "config.json").is_file()


@dataclass
class TrainReport(StageResult):
    """What one training stage did (its ``summary.json`` entry ``train/<stage>``): the summary the trainer
    returned (steps, losses, timings, artefacts; PPO: how OpenRLHF exited)."""

    summary: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """The trainer's summary, as it is."""
        return dict(self.summary)

    def failure_count(self) -> int:
        """None: training has no items that fail one by one (a failed training raises)."""
        return 0


class TrainStage(StageUnit[TrainConfig]):
    """The training stage: one summary entry ``train/<stage>`` per training stage."""

    name = "train"
    config_type = TrainConfig
    session = None

    def entries(self, config: TrainConfig) -> list[str]:
        """``train/sft``, ``train/dpo``, … in the order the recipe lists them."""
        return [f"train/{stage}" for stage in config.stages]

    async def run(self, context: StageContext, config: TrainConfig, entry: str) -> TrainReport:
        """Train one stage in a worker thread; its report (steps, losses, artefacts)."""
        from cai_async.train.run import run_training

        stage = entry.removeprefix("train/")
        result: dict[str, Any] = await anyio.to_thread.run_sync(functools.partial(
            run_training, stage, config, context.run_dir, engine_config=context.recipe.engine))
        return TrainReport(result)

    def outputs(self, config: TrainConfig, entry: str, run_dir: Path) -> list[Path]:
        """The stage's output folder (``train.output_dir/<stage>`` or ``RUN_DIR/train/<stage>``), and its ``merged``
        folder with ``merge`` and LoRA (a LoRA reward model is usable as a model only merged: see
        :meth:`_reward_model`)."""
        stage = entry.removeprefix("train/")
        out = Path(config.output_dir) / stage if config.output_dir else run_dir / "train" / stage
        if stage == "rl" and config.rl_algorithm == "ppo":
            return [out / "openrlhf"]
        return [out, out / "merged"] if config.merge and config.lora.enabled else [out]

    def inputs(self, config: TrainConfig, entry: str, run_dir: Path) -> list[StageInput]:
        """The export it trains on (or the file that replaces it); with ``reward_from: reward_model`` the trained
        reward model; for PPO, OpenRLHF's prompts, a Hugging Face model folder and OpenRLHF itself; else the
        model and the training stack."""
        stage = entry.removeprefix("train/")
        earlier: list[str] = list(config.stages[:config.stages.index(stage)]) if stage in config.stages else []
        if stage == "rl" and config.rl_algorithm == "ppo":
            return self._ppo_inputs(config, run_dir, earlier)
        export, key, section = _DATA.get(stage, _DATA["dpo"])
        given: str | None = getattr(config, key.removeprefix("train."))
        needs = [StageInput(
            what=f"{stage} training data" if given else f"the {export} export", key=key,
            path=given or run_dir / "exports" / f"{export}.parquet",
            fix=f"add {section} to the recipe (it writes exports/{export}.parquet) or set {key} to a Parquet file")]
        if stage == "rl" and config.rl_algorithm in ("grpo", "rloo", "online_dpo") \
                and config.reward_from == "reward_model":
            needs.append(self._reward_model(config, run_dir, earlier, None))
        if config.model != "embedded":
            needs.append(StageInput(
                what="train.model", path=config.model, key="train.model",
                fix="set train.model to a Hugging Face model folder (with config.json), a .gguf file or 'embedded'"))
        missing = _missing_modules(TRAINING_MODULES)
        needs.append(StageInput(what=f"the training stack ({', '.join(missing or TRAINING_MODULES)})",
                                ready=lambda: not missing, fix="pip install 'cai-async[train]'"))
        return needs

    @staticmethod
    def _reward_model(config: TrainConfig, run_dir: Path, earlier: list[str], given: str | None) -> StageInput:
        """The reward model an online stage scores with: ``given`` (``train.reward_server.reward_model``), or the
        one the run's reward stage trained (``RUN_DIR/train/reward``; with LoRA, its ``merged`` folder)."""
        if given:
            return StageInput(what="reward model", path=given, key="train.reward_server.reward_model",
                              fix="set train.reward_server.reward_model to a reward model folder (with config.json)")
        folder = run_dir / "train" / "reward"
        if "reward" in earlier and config.lora.enabled and not config.merge:
            fix = ("the reward stage before it saves only a LoRA adapter: set train.merge: true (or "
                   "train.lora.enabled: false)")
        elif "reward" in earlier and config.output_dir:
            fix = ("train.output_dir puts the reward stage's model elsewhere; leave output_dir unset or set "
                   "train.reward_server.reward_model")
        else:
            fix = ("list reward before rl in train.stages (with train.merge: true and a label section for its data), "
                   "or use reward_from: judge")
        return StageInput(what="trained reward model", path=folder / "merged" if config.lora.enabled else folder,
                          ready=functools.partial(_has_reward_model, folder), fix=fix)

    def _ppo_inputs(self, config: TrainConfig, run_dir: Path, earlier: list[str]) -> list[StageInput]:
        from cai_async.train.ppo import OPENRLHF_MODULES, missing_openrlhf

        ppo = config.ppo
        source = config.rl_prompts or config.dpo_data
        if ppo.prompts:
            prompts = StageInput(what="PPO prompt file", path=ppo.prompts, key="train.ppo.prompts",
                                 fix="set train.ppo.prompts to a JSONL file with an input conversation a line")
        else:
            prompts = StageInput(
                what="prompts for PPO" if source else "the dpo export (PPO's prompts)",
                path=source or run_dir / "exports" / "dpo.parquet",
                fix="add a label section to the recipe (its dpo export gives the prompts), or set train.rl_prompts "
                    "or train.ppo.prompts")
        needs = [prompts]
        if ppo.reward_url is None and (config.reward_server.reward_from or config.reward_from) == "reward_model":
            needs.append(self._reward_model(config, run_dir, earlier, config.reward_server.reward_model))
        model = config.model
        if model == "embedded" or model.endswith(".gguf") or config.gguf_file:
            needs.append(StageInput(
                what=f"a Hugging Face model folder for OpenRLHF (train.model {model!r} is a GGUF model)",
                ready=lambda: False, fix="set train.model to a local folder with config.json (vLLM and DeepSpeed "
                                         "load it)"))
        missing = missing_openrlhf()
        needs.append(StageInput(
            what=f"OpenRLHF ({', '.join(missing or OPENRLHF_MODULES)})", ready=lambda: not missing,
            fix="pip install 'cai-async[openrlhf]' on a machine with CUDA GPUs, or leave training out of this run "
                "(--set train=null) and run `cai train rl RECIPE` where OpenRLHF is installed"))
        return needs


STAGE = TrainStage()
"""The registered unit."""
