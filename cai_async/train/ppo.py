"""``rl_algorithm: ppo`` through OpenRLHF (Ray + vLLM + DeepSpeed, CUDA GPUs): the launch command of
``openrlhf.cli.train_ppo_ray`` (0.11's hierarchical flags, ``--actor.model_name_or_path``, ``--reward.remote_url``…)
is written from the recipe into ``RUN_DIR/train/rl/openrlhf/`` with its prompt file, then run with
``cai reward serve``'s server answering the rewards in the same process, or printed (``--dry-run``)."""

from __future__ import annotations

import importlib.util
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from backends.atomic import atomic_path
from backends.errors import ConfigError, TrainerFailed
from cai_async.engine.config import EngineConfig
from cai_async.train.config import TrainConfig

__all__ = ["OPENRLHF_MODULES", "missing_openrlhf", "ppo_command", "run_ppo"]

OPENRLHF_MODULES = ("openrlhf", "ray", "vllm", "deepspeed")
"""What the PPO path imports (in OpenRLHF's processes)."""


def missing_openrlhf() -> list[str]:
    """The modules of :data:`OPENRLHF_MODULES` this Python cannot import."""
    return [name for name in OPENRLHF_MODULES if importlib.util.find_spec(name) is None]


def _prompts(config: TrainConfig, root: Path, out: Path) -> Path:
    """The prompt file OpenRLHF reads (``--data.prompt_dataset``): one ``{"input": [messages]}`` a line."""
    if config.ppo.prompts:
        return Path(config.ppo.prompts)
    from cai_async.train.data import load_training_data

    dataset = load_training_data(config.rl_prompts or config.dpo_data or root / "exports" / "dpo.parquet", "rl")
    path = out / "prompts.jsonl"
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as handle:
        for prompt in dataset["prompt"]:
            turns = prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
            handle.write(json.dumps({"input": turns}, ensure_ascii=False) + "\n")
    return path


def ppo_command(config: TrainConfig, run_dir: str | Path, *, reward_url: str) -> tuple[list[str], dict[str, Any]]:
    """The ``train_ppo_ray`` command for ``config`` and the flags it sets, as a mapping (written beside it as
    ``config.json``)."""
    root = Path(run_dir)
    out = (Path(config.output_dir) / "rl" if config.output_dir else root / "train" / "rl") / "openrlhf"
    folder = config.model  # a folder on the machine OpenRLHF runs on: it need not exist here
    if folder == "embedded" or folder.endswith(".gguf") or config.gguf_file:
        raise ConfigError(f"train.model {config.model!r} is a GGUF model; OpenRLHF (vLLM + DeepSpeed) needs a Hugging "
                          "Face model folder (with config.json) for rl_algorithm ppo")
    ppo = config.ppo
    gpus = ppo.gpus_per_node
    flags: dict[str, Any] = {
        "--actor.model_name_or_path": folder,
        "--reward.remote_url": reward_url,
        "--data.prompt_dataset": str(_prompts(config, root, out)),
        "--data.input_key": "input",
        "--data.apply_chat_template": True,
        "--data.max_len": config.max_length,
        "--rollout.max_new_tokens": config.max_completion_length,
        "--actor.adam.lr": config.rl_learning_rate,
        "--critic.adam.lr": ppo.critic_learning_rate,
        "--algo.kl.init_coef": config.beta,
        "--algo.advantage.estimator": ppo.advantage_estimator,
        "--train.num_episodes": max(1, math.ceil(config.rl_epochs)),
        "--train.max_epochs": ppo.ppo_epochs,
        "--train.micro_batch_size": config.batch_size,
        "--train.batch_size": config.batch_size * config.gradient_accumulation_steps * gpus * ppo.num_nodes,
        "--rollout.batch_size": ppo.rollout_batch_size,
        "--rollout.micro_batch_size": config.batch_size,
        "--rollout.n_samples_per_prompt": ppo.n_samples_per_prompt,
        "--train.seed": config.seed,
        "--actor.num_nodes": ppo.num_nodes,
        "--actor.num_gpus_per_node": gpus,
        "--critic.num_nodes": ppo.num_nodes,
        "--critic.num_gpus_per_node": gpus,
        "--ref.num_nodes": ppo.num_nodes,
        "--ref.num_gpus_per_node": gpus,
        "--vllm.num_engines": ppo.vllm_engines,
        "--vllm.tensor_parallel_size": ppo.vllm_tensor_parallel_size,
        "--vllm.gpu_memory_utilization": ppo.vllm_gpu_memory_utilization,
        "--train.colocate_all": ppo.colocate_all,
        "--vllm.enable_sleep": ppo.colocate_all,
        "--ds.enable_sleep": ppo.colocate_all,
        "--ds.zero_stage": ppo.zero_stage,
        "--ds.param_dtype": ppo.param_dtype,
        "--actor.gradient_checkpointing_enable": config.gradient_checkpointing,
        "--ckpt.output_dir": str(out / "model"),
        "--ckpt.path": str(out / "checkpoints"),
        "--ckpt.save_steps": config.save_steps or -1,
        "--logger.logging_steps": config.logging_steps,
        "--logger.tensorboard_dir": str(out / "tensorboard"),
    }
    if config.lora.enabled:
        flags.update({"--ds.lora.rank": config.lora.r, "--ds.lora.alpha": config.lora.alpha,
                      "--ds.lora.dropout": config.lora.dropout})
    command = [sys.executable, "-m", "openrlhf.cli.train_ppo_ray"]
    for flag, value in flags.items():
        if value is True:
            command.append(flag)
        elif value is not False and value is not None:
            command += [flag, str(value)]
    return [*command, *ppo.extra_args], {"flags": flags, "extra_args": list(ppo.extra_args), "output_dir": str(out)}


def run_ppo(config: TrainConfig, run_dir: str | Path, *, engine_config: EngineConfig | None = None,
            dry_run: bool = False) -> dict[str, Any]:
    """Write the OpenRLHF launch (``launch.sh``, ``config.json``, ``prompts.jsonl``) and run it, with the reward
    server up for the run unless ``train.ppo.serve_reward`` is off; with ``dry_run`` only write and return it."""
    missing = [] if dry_run else missing_openrlhf()
    if missing:
        raise ConfigError(f"rl_algorithm ppo runs through OpenRLHF (Ray + vLLM + DeepSpeed), which needs CUDA GPUs: "
                          f"pip install 'cai-async[openrlhf]' (missing: {', '.join(missing)}); or --dry-run to "
                          f"write the command only")
    ppo = config.ppo
    server = config.reward_server
    url = ppo.reward_url or server.url
    command, spec = ppo_command(config, run_dir, reward_url=url)
    out = Path(spec["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    line = shlex.join(command)
    (out / "launch.sh").write_text(f"#!/bin/sh\n# written by cai-async: rl_algorithm ppo through OpenRLHF\n{line}\n",
                                   encoding="utf-8")
    (out / "config.json").write_text(json.dumps({**spec, "command": command}, indent=2), encoding="utf-8")
    summary: dict[str, Any] = {"stage": "rl", "algorithm": "ppo", "command": line, "reward_url": url,
                               "output_dir": str(out), "launch": str(out / "launch.sh"), "dry_run": dry_run}
    if dry_run:
        return summary
    start = time.perf_counter()
    if ppo.serve_reward and ppo.reward_url is None:
        returncode = _run_with_reward_server(config, run_dir, engine_config, command, out)
    else:
        returncode = _run_logged(command, out)
    summary.update(returncode=returncode, seconds=round(time.perf_counter() - start, 2))
    if returncode != 0:
        raise TrainerFailed(f"OpenRLHF exited with status {returncode}; its output is in {out / 'openrlhf.log'}")
    return summary


def _run_logged(command: list[str], out: Path) -> int:
    with (out / "openrlhf.log").open("a", encoding="utf-8") as log:
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False).returncode


def _run_with_reward_server(config: TrainConfig, run_dir: str | Path, engine_config: EngineConfig | None,
                            command: list[str], out: Path) -> int:
    """Run OpenRLHF while the reward server answers on a blocking portal's event loop in this process."""
    import anyio
    import anyio.from_thread

    from cai_async.train.reward_server import RewardService, serve_rewards, service_for

    with anyio.from_thread.start_blocking_portal() as portal:
        service: RewardService = portal.call(service_for, config, run_dir, engine_config)
        stop = portal.call(anyio.Event)
        ready = portal.call(anyio.Event)
        future = portal.start_task_soon(lambda: serve_rewards(service, on_ready=lambda _: ready.set(), stop=stop,
                                                              signals=False))
        portal.call(ready.wait)
        try:
            return _run_logged(command, out)
        finally:
            portal.call(stop.set)
            future.result(timeout=60)
