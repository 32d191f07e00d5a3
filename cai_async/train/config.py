"""Training configuration (recipe key ``train``): model, LoRA, batch and sequence settings, the seed card's
``sl_epochs``, ``rl_algorithm`` and ``rl_learning_rate``; the reward server and OpenRLHF's PPO settings. torch and
TRL are not imported here."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator

from backends.deprecation import renamed
from backends.errors import ConfigError
from backends.strict import StrictModel
from cai_async.engine.config import JUDGE, OLD_JUDGE

__all__ = ["LoraSettings", "PPOSettings", "RLAlgorithm", "RewardServerConfig", "TrainConfig", "TrainStage"]

TrainStage = Literal["sft", "reward", "dpo", "rl"]
RLAlgorithm = Literal["dpo", "soft_dpo", "grpo", "rloo", "online_dpo", "ppo"]
_ALGORITHMS: tuple[str, ...] = RLAlgorithm.__args__  # type: ignore[attr-defined]


def _judge_name(value: Any) -> Any:
    """``critic``, the judge's former name, read as ``judge`` (with one line saying so)."""
    if value == OLD_JUDGE:
        renamed(OLD_JUDGE, JUDGE, where="reward_from")
        return JUDGE
    return value


RewardFrom = Annotated[Literal["judge", "reward_model"], BeforeValidator(_judge_name)]
"""Where an online-RL reward comes from: the constitution through the judge group (``critic``, its old name, still
read), or a trained reward model."""


class RewardServerConfig(StrictModel):
    """``cai reward serve`` (recipe key ``train.reward_server``): where it listens, what scores, how it batches."""

    host: str = "127.0.0.1"
    port: int = Field(default=5000, ge=0, le=65535)
    """OpenRLHF's own reward server listens on 5000 too; 0 takes any free port."""
    reward_from: RewardFrom | None = None
    """Default: ``train.reward_from``."""
    reward_model: str | None = None
    """A reward model folder (default: RUN_DIR/train/reward, its ``merged`` folder when there is one)."""
    max_batch: int = Field(default=64, ge=1)
    batch_wait_ms: float = Field(default=5.0, ge=0)
    cache_size: int = Field(default=100_000, ge=0)
    """Rewards kept in memory by (prompt, response); 0 turns the in-memory cache off."""

    @property
    def url(self) -> str:
        """The URL OpenRLHF is given (``--reward.remote_url``)."""
        return f"http://{self.host}:{self.port}/get_reward"


class PPOSettings(StrictModel):
    """OpenRLHF settings the rest of ``train`` does not say (recipe key ``train.ppo``)."""

    reward_url: str | None = None
    """Default: ``cai reward serve`` on ``train.reward_server`` (started by ``cai train rl`` for the run)."""
    serve_reward: bool = True
    """Start the reward server in this process while OpenRLHF runs (off: one is already running)."""
    prompts: str | None = None
    """JSONL with an ``input`` conversation per line (default: written from ``train.rl_prompts`` or the prompts
    of the dpo export, like the TRL online trainers)."""
    gpus_per_node: int = Field(default=1, ge=1)
    num_nodes: int = Field(default=1, ge=1)
    vllm_engines: int = Field(default=1, ge=1)
    vllm_tensor_parallel_size: int = Field(default=1, ge=1)
    vllm_gpu_memory_utilization: float = Field(default=0.5, gt=0, le=1)
    colocate_all: bool = True
    """Actor, critic, reference and vLLM on the same GPUs (what one GPU needs)."""
    advantage_estimator: Literal["gae", "reinforce", "rloo", "reinforce_baseline", "group_norm", "dr_grpo"] = "gae"
    """gae: PPO with a critic (the method's RL algorithm)."""
    rollout_batch_size: int = Field(default=8, ge=1)
    n_samples_per_prompt: int = Field(default=1, ge=1)
    ppo_epochs: int = Field(default=1, ge=1)
    critic_learning_rate: float = Field(default=9e-6, gt=0)
    zero_stage: Literal[0, 1, 2, 3] = 2
    param_dtype: Literal["bf16", "fp16"] = "bf16"
    extra_args: list[str] = Field(default_factory=list)
    """More ``train_ppo_ray`` flags, passed as given (they win over the ones above)."""


class LoraSettings(StrictModel):
    """LoRA through peft (the default); ``enabled: false`` means full finetuning."""

    enabled: bool = True
    r: int = Field(default=16, ge=1)
    alpha: int = Field(default=32, ge=1)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"


class TrainConfig(StrictModel):
    """What to train, on which data, and how."""

    stages: list[TrainStage] = Field(default=["sft"])
    """Run by ``cai run`` in this order; ``cai train STAGE`` runs one."""
    model: str = "embedded"
    """A Hugging Face model folder, a .gguf file (de-quantized by transformers), or ``embedded`` (SmolLM2)."""
    gguf_file: str | None = None
    """A .gguf file inside ``model`` when ``model`` is a folder holding one."""
    output_dir: str | None = None
    """Default: RUN_DIR/train/<stage>."""
    sft_data: str | None = None
    """Default: RUN_DIR/exports/sft.parquet; likewise reward_data and dpo_data."""
    reward_data: str | None = None
    dpo_data: str | None = None
    rl_prompts: str | None = None
    """Prompts for online RL (default: the prompts of RUN_DIR/exports/dpo.parquet)."""
    lora: LoraSettings = Field(default_factory=LoraSettings)
    merge: bool = False
    """Also save the merged model (base + adapter) in ``output_dir/merged``."""
    sl_epochs: float = Field(default=1.0, gt=0)
    learning_rate: float = Field(default=2e-4, gt=0)
    """SFT and reward-model learning rate."""
    rl_algorithm: RLAlgorithm = "soft_dpo"
    rl_learning_rate: float = Field(default=5e-6, gt=0)
    rl_epochs: float = Field(default=1.0, gt=0)
    beta: float = Field(default=0.1, gt=0)
    batch_size: int = Field(default=4, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    max_length: int = Field(default=1024, ge=16)
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: run the epochs)."""
    num_generations: int = Field(default=4, ge=2)
    """Online RL: completions per prompt."""
    max_completion_length: int = Field(default=64, ge=1)
    rl_principles: str = "harmless"
    """Online RL with the critic reward: the comparison set its questions come from."""
    rl_ensemble: int = Field(default=2, ge=1)
    reward_from: RewardFrom = "judge"
    """Online RL reward: the constitutional labeller through the engine's judge group (``critic``, its old name,
    still works), or a trained reward model (``output_dir`` of the reward stage)."""
    assistant_only_loss: bool = True
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """auto: bf16 on a GPU that supports it, fp32 on the CPU."""
    gradient_checkpointing: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    logging_steps: int = Field(default=1, ge=1)
    save_steps: int = Field(default=0, ge=0)
    """Checkpoint every N steps (0: only at the end)."""

    @field_validator("rl_algorithm", mode="before")
    @classmethod
    def _algorithm(cls, value: object) -> object:
        """Names are case-insensitive (``DPO``, ``Soft-DPO``)."""
        if not isinstance(value, str):
            return value
        name = value.strip().lower().replace("-", "_")
        if name not in _ALGORITHMS:
            raise ValueError(f"unknown rl_algorithm {value!r}: use one of {', '.join(_ALGORITHMS)}")
        return name

    reward_server: RewardServerConfig = Field(default_factory=RewardServerConfig)
    """``cai reward serve``: OpenRLHF's remote reward protocol, and the reward ``ppo`` trains on."""
    ppo: PPOSettings = Field(default_factory=PPOSettings)
    """``rl_algorithm: ppo``: OpenRLHF's GPUs, vLLM engines, rollout batch and flags the rest does not say."""

    def check_stage(self, stage: str) -> None:
        if stage not in ("sft", "reward", "dpo", "rl"):
            raise ConfigError(f"unknown training stage {stage!r}: use sft, reward, dpo or rl")
