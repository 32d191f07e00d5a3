"""Run one training stage with TRL: SFT on the SL-CAI ``sft`` export, a reward model on ``reward``, (soft-label)
DPO on ``dpo``, or online RL. Writes the adapter (or full model), ``metrics.csv``, ``metrics.json`` and
``loss.png`` into the stage's output folder."""

from __future__ import annotations

import csv
import json
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import anyio.from_thread

from backends.atomic import write_atomic, write_json
from backends.errors import ConfigError
from cai_async.engine.config import EngineConfig
from cai_async.train.config import TrainConfig
from cai_async.train.data import load_training_data, sequence_lengths
from cai_async.train.models import load_model, load_tokenizer, trained_reward_model
from cai_async.train.rewards import ConstitutionalReward, SyncReward

__all__ = ["run_training", "training_device"]


def training_device(config: TrainConfig) -> tuple[str, Any, dict[str, bool]]:
    """``(device, torch dtype, precision flags for TrainingArguments)`` from ``device`` and ``precision``."""
    import torch

    cuda = torch.cuda.is_available() and config.device != "cpu"
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but torch sees no GPU (CPU build of torch, or no driver)")
    precision = config.precision
    if precision == "auto":
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if precision in ("bf16", "fp16") and not cuda:
        raise ConfigError(f"train.precision {precision!r} needs a GPU; use fp32 (or auto) on the CPU")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    flags = {"bf16": precision == "bf16", "fp16": precision == "fp16", "use_cpu": not cuda}
    return ("cuda" if cuda else "cpu"), dtype, flags


def _callback(rows: list[dict[str, Any]]) -> Any:
    from transformers import TrainerCallback

    class MetricsLog(TrainerCallback):
        """Keeps every logged metric with its step."""

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **_: Any) -> None:
            if logs:
                rows.append({"step": state.global_step, "time_s": round(time.time(), 3),
                             **{k: v for k, v in logs.items() if isinstance(v, int | float | str)}})

    return MetricsLog()


def _write_metrics(rows: list[dict[str, Any]], out: Path) -> None:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with (out / "metrics.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    write_atomic(out / "metrics.json", json.dumps(rows, indent=1))
    losses = [(r["step"], float(r["loss"])) for r in rows if "loss" in r]
    if losses:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([s for s, _ in losses], [v for _, v in losses], marker=".")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title(out.name)
        fig.tight_layout()
        fig.savefig(out / "loss.png", dpi=100)
        plt.close(fig)


def _common_args(config: TrainConfig, out: Path, flags: dict[str, bool], *, lr: float, epochs: float) -> dict[str, Any]:
    return {
        "output_dir": str(out), "learning_rate": lr, "num_train_epochs": epochs, "max_steps": config.max_steps,
        "per_device_train_batch_size": config.batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps, "logging_steps": config.logging_steps,
        "save_strategy": "steps" if config.save_steps else "no", "save_steps": config.save_steps or 500,
        "gradient_checkpointing": config.gradient_checkpointing, "report_to": [], "seed": config.seed,
        "max_length": config.max_length, "disable_tqdm": False, **flags,
    }


def _peft(config: TrainConfig) -> Any:
    if not config.lora.enabled:
        return None
    from peft import LoraConfig

    task = "CAUSAL_LM"
    return LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                      target_modules=config.lora.target_modules, task_type=task)


def run_training(
    stage: str, config: TrainConfig, run_dir: str | Path, *, engine_config: EngineConfig | None = None
) -> dict[str, Any]:
    """Train ``stage`` (sft | reward | dpo | rl) and return a summary (steps, losses, timings, artefacts).
    Online RL with ``reward_from: judge`` judges completions through ``engine_config``'s judge group. Under
    ``accelerate launch`` every process trains its share and only the main process writes the artefacts."""
    config.check_stage(stage)
    if stage == "rl" and config.rl_algorithm == "ppo":  # OpenRLHF, in processes of its own
        from cai_async.train.ppo import run_ppo

        return run_ppo(config, run_dir, engine_config=engine_config)
    root = Path(run_dir)
    out = Path(config.output_dir) / stage if config.output_dir else root / "train" / stage
    out.mkdir(parents=True, exist_ok=True)
    device, dtype, flags = training_device(config)
    tokenizer = load_tokenizer(config.model, config.gguf_file)
    algorithm = config.rl_algorithm if stage in ("dpo", "rl") else stage
    if stage == "dpo" and algorithm not in ("dpo", "soft_dpo"):
        algorithm = "soft_dpo"
    kind = {"sft": "sft", "reward": "reward", "dpo": algorithm, "soft_dpo": "soft_dpo"}.get(algorithm, "rl")
    default = {"sft": "sft", "reward": "reward"}.get(stage, "dpo")
    data_path = {"sft": config.sft_data, "reward": config.reward_data}.get(stage, config.dpo_data)
    dataset = load_training_data(data_path or root / "exports" / f"{default}.parquet", kind)
    columns = {"sft": ("messages",), "reward": ("chosen", "rejected")}.get(stage, ("chosen", "rejected"))
    lengths = sequence_lengths(dataset, tokenizer, columns) if kind != "rl" else []
    too_long = sum(n > config.max_length for n in lengths)
    summary: dict[str, Any] = {"stage": stage, "algorithm": algorithm, "rows": len(dataset), "device": device,
                               "precision": str(dtype).removeprefix("torch."), "output_dir": str(out),
                               "rows_over_max_length": too_long, "max_length": config.max_length}
    if stage == "reward" and lengths and too_long == len(lengths):
        raise ConfigError(
            f"every reward row is longer than train.max_length={config.max_length} tokens (shortest "
            f"{min(lengths)}); TRL's RewardTrainer drops such rows, so nothing would be left: raise max_length"
        )
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    reward = None
    with ExitStack() as stack:
        if kind == "rl":
            reward = _online_reward(config, root, engine_config)
            if algorithm == "online_dpo" and isinstance(reward, ConstitutionalReward):
                # online DPO calls reward functions synchronously: the async reward runs on a portal's loop
                portal = stack.enter_context(anyio.from_thread.start_blocking_portal())
                stack.callback(portal.call, reward.aclose)
                reward = SyncReward(reward, portal)
        trainer = _build(stage, algorithm, config, out, flags, dtype, tokenizer, dataset, [_callback(rows)], reward)
        _quiet_console(trainer)
        try:
            result = trainer.train()
        finally:
            if isinstance(reward, ConstitutionalReward) and reward.opened:
                import asyncio

                asyncio.run_coroutine_threadsafe(reward.aclose(), trainer.async_loop).result(timeout=60)
    if isinstance(reward, SyncReward):
        reward = reward.reward
    if isinstance(reward, ConstitutionalReward):
        summary["reward_judgments"] = reward.calls
    summary["seconds"] = round(time.perf_counter() - start, 2)
    summary["processes"] = trainer.accelerator.num_processes  # > 1 under accelerate launch (DDP, ZeRO-3)
    summary["global_batch"] = trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps \
        * trainer.accelerator.num_processes
    losses = [float(r["loss"]) for r in rows if "loss" in r]
    summary.update(steps=result.global_step, train_loss=float(result.training_loss),
                   first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None)
    if stage == "reward":
        summary["rows_dropped_too_long"] = too_long
    trainer.save_model(str(out))  # collective under ZeRO-3: every process takes part; only the main one writes
    main = trainer.is_world_process_zero()
    if main:
        tokenizer.save_pretrained(str(out))
    if config.merge and config.lora.enabled:
        summary["merged_dir"] = str(out / "merged")
        if main:
            merged = trainer.model.merge_and_unload()
            merged.save_pretrained(str(out / "merged"))
            tokenizer.save_pretrained(str(out / "merged"))
    if not main:
        summary["artefacts"] = []
        return summary
    _write_metrics(rows, out)
    summary["artefacts"] = sorted(p.name for p in out.iterdir())
    write_json(out / "summary.json", summary)
    return summary


def _online_reward(config: TrainConfig, root: Path, engine_config: EngineConfig | None) -> Any:
    if config.reward_from == "reward_model":
        return str(trained_reward_model(root))
    if engine_config is None:
        raise ConfigError("online RL with reward_from: judge needs the recipe's engine (its judge group)")
    return ConstitutionalReward(engine_config, root, principles=config.rl_principles, ensemble=config.rl_ensemble,
                                seed=config.seed)


def _quiet_console(trainer: Any) -> None:
    """Without ``--verbose`` (progress bars off), transformers would print each log dict to the console instead;
    the metrics go to ``metrics.csv`` and the run log anyway."""
    import os

    if os.environ.get("TQDM_DISABLE") != "1":
        return
    from transformers import PrinterCallback, ProgressCallback

    for callback in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(callback)


def _build(stage: str, algorithm: str, config: TrainConfig, out: Path, flags: dict[str, bool], dtype: Any,
           tokenizer: Any, dataset: Any, callbacks: list[Any], reward: Any = None) -> Any:
    import importlib

    trl: Any = importlib.import_module("trl")
    peft = _peft(config)
    if stage == "sft":
        model = load_model(config.model, gguf_file=config.gguf_file, dtype=dtype)
        args = trl.SFTConfig(**_common_args(config, out, flags, lr=config.learning_rate, epochs=config.sl_epochs),
                             assistant_only_loss=config.assistant_only_loss)
        return trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                              peft_config=peft, callbacks=callbacks)
    if stage == "reward":
        model = load_model(config.model, gguf_file=config.gguf_file, task="reward", dtype=dtype)
        if peft is not None:
            peft.task_type = "SEQ_CLS"
            peft.modules_to_save = ["score"]
        args = trl.RewardConfig(**_common_args(config, out, flags, lr=config.learning_rate, epochs=config.sl_epochs))
        return trl.RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                 peft_config=peft, callbacks=callbacks)
    if algorithm in ("dpo", "soft_dpo"):
        from cai_async.train.soft_dpo import soft_dpo_trainer_class

        model = load_model(config.model, gguf_file=config.gguf_file, dtype=dtype)
        args = trl.DPOConfig(**_common_args(config, out, flags, lr=config.rl_learning_rate, epochs=config.rl_epochs),
                             beta=config.beta)
        cls = soft_dpo_trainer_class() if algorithm == "soft_dpo" else trl.DPOTrainer
        if algorithm == "dpo" and "confidence" in dataset.column_names:
            dataset = dataset.remove_columns("confidence")
        return cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft,
                   callbacks=callbacks)
    model = load_model(config.model, gguf_file=config.gguf_file, dtype=dtype)
    common = _common_args(config, out, flags, lr=config.rl_learning_rate, epochs=config.rl_epochs)
    common.pop("max_length")
    online = {"num_generations": config.num_generations, "max_completion_length": config.max_completion_length,
              "beta": config.beta}
    if algorithm == "online_dpo":  # trl.experimental: two samples per prompt, ranked by the reward, then DPO
        from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

        args = OnlineDPOConfig(**common, max_new_tokens=config.max_completion_length, max_length=config.max_length,
                               beta=[config.beta], temperature=1.0)
        return OnlineDPOTrainer(model=model, reward_funcs=[reward], args=args,
                                train_dataset=dataset.select_columns(["prompt"]), processing_class=tokenizer,
                                peft_config=peft, callbacks=callbacks)
    config_cls, trainer_cls = (trl.GRPOConfig, trl.GRPOTrainer) if algorithm == "grpo" else (
        trl.RLOOConfig, trl.RLOOTrainer)
    return trainer_cls(model=model, reward_funcs=[reward], args=config_cls(**common, **online),
                       train_dataset=dataset.select_columns(["prompt"]), processing_class=tokenizer,
                       peft_config=peft, callbacks=callbacks)
