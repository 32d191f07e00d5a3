"""Training with TRL on CPU: a tiny model built in the tests, every trainer for a few steps on a small
memorizable set, the soft-label DPO loss against its formula, artefacts that load back, and bad input."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from cai_async import ConfigError
from cai_async.train import TrainConfig, run_training
from tests.test_cli import cai

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


def _conversation(user: str, assistant: str | None = None) -> list[dict[str, str]]:
    turns = [{"role": "user", "content": user}]
    return [*turns, {"role": "assistant", "content": assistant}] if assistant is not None else turns


QUESTIONS = ["How do I hurt someone?", "Tell me a secret about my neighbour.", "Write an insult.", "Hack a bank."]
SAFE = "I can't help with that, but I can help you stay safe."
UNSAFE = "Sure, here is exactly how to do it step by step."


def write_exports(run_dir: Path, *, confidence: float = 0.9, repeat: int = 4) -> Path:
    exports = run_dir / "exports"
    exports.mkdir(parents=True, exist_ok=True)
    qs = QUESTIONS * repeat
    pl.DataFrame({"id": [str(i) for i in range(len(qs))],
                  "messages": [_conversation(q, SAFE) for q in qs]}).write_parquet(exports / "sft.parquet")
    pl.DataFrame({
        "id": [str(i) for i in range(len(qs))], "prompt": [_conversation(q) for q in qs],
        "chosen": [[{"role": "assistant", "content": SAFE}]] * len(qs),
        "rejected": [[{"role": "assistant", "content": UNSAFE}]] * len(qs),
        "confidence": [confidence] * len(qs),
    }).write_parquet(exports / "dpo.parquet")
    pl.DataFrame({
        "id": [str(i) for i in range(len(qs))], "chosen": [_conversation(q, SAFE) for q in qs],
        "rejected": [_conversation(q, UNSAFE) for q in qs], "margin": [1.0] * len(qs),
    }).write_parquet(exports / "reward.parquet")
    return run_dir


def config(tiny: Path, **changes: Any) -> TrainConfig:
    base: dict[str, Any] = {"model": str(tiny), "max_steps": 12, "batch_size": 4, "max_length": 128,
                            "learning_rate": 2e-2, "rl_learning_rate": 2e-2, "lora": {"enabled": False}}
    return TrainConfig.model_validate({**base, **changes})


def test_sft_learns_a_memorizable_set_and_loads_back(tmp_path: Path, tiny: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = write_exports(tmp_path)
    summary = run_training("sft", config(tiny, max_steps=120, learning_rate=3e-2), run_dir)
    assert summary["steps"] == 120 and summary["device"] == "cpu" and summary["precision"] == "float32"
    assert summary["last_loss"] < 0.5 * summary["first_loss"]
    out = Path(summary["output_dir"])
    assert {"metrics.csv", "metrics.json", "loss.png", "summary.json"} <= set(p.name for p in out.iterdir())
    assert (out / "loss.png").read_bytes().startswith(b"\x89PNG")
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer.apply_chat_template(_conversation(QUESTIONS[0]), add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    output = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(output[0][prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text.startswith("I can't help"), text  # it memorized the revision


def test_lora_sft_saves_an_adapter_and_a_merged_model(tmp_path: Path, tiny: Path) -> None:
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    run_dir = write_exports(tmp_path)
    summary = run_training("sft", config(tiny, lora={"enabled": True, "r": 8}, merge=True, max_steps=20), run_dir)
    out = Path(summary["output_dir"])
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert summary["last_loss"] < summary["first_loss"]
    AutoPeftModelForCausalLM.from_pretrained(out)
    merged = AutoModelForCausalLM.from_pretrained(summary["merged_dir"])
    assert not hasattr(merged, "peft_config")


def test_reward_model_ranks_chosen_above_rejected(tmp_path: Path, tiny: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run_dir = write_exports(tmp_path)
    summary = run_training("reward", config(tiny, max_steps=25), run_dir)
    assert summary["last_loss"] < summary["first_loss"] and summary["rows_dropped_too_long"] == 0
    out = Path(summary["output_dir"])
    model = AutoModelForSequenceClassification.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)

    def score(answer: str) -> float:
        ids = tokenizer.apply_chat_template(_conversation(QUESTIONS[1], answer), return_tensors="pt",
                                            return_dict=True)
        with torch.no_grad():
            return float(model(**ids).logits[0, 0])

    assert score(SAFE) > score(UNSAFE)


@pytest.mark.parametrize("algorithm", ["dpo", "soft_dpo"])
def test_dpo_loss_goes_down(tmp_path: Path, tiny: Path, algorithm: str) -> None:
    run_dir = write_exports(tmp_path, confidence=0.95)
    summary = run_training("dpo", config(tiny, rl_algorithm=algorithm, max_steps=15), run_dir)
    assert summary["algorithm"] == algorithm
    assert summary["first_loss"] == pytest.approx(math.log(2), abs=1e-3)  # policy == reference at step 0
    assert summary["last_loss"] < summary["first_loss"] - 0.05


def test_soft_dpo_loss_matches_the_formula() -> None:
    import torch

    from cai_async.train.soft_dpo import soft_dpo_loss

    logits = torch.tensor([2.0, -1.0, 0.0, 3.0])
    confidence = torch.tensor([1.0, 0.75, 0.5, 0.6])

    def by_hand(z: float, c: float) -> float:
        sig = 1 / (1 + math.exp(-z))
        return -c * math.log(sig) - (1 - c) * math.log(1 - sig)

    expected = [by_hand(z, c) for z, c in zip([2.0, -1.0, 0.0, 3.0], [1.0, 0.75, 0.5, 0.6], strict=True)]
    assert soft_dpo_loss(logits, confidence).tolist() == pytest.approx(expected, abs=1e-6)
    assert expected[0] == pytest.approx(math.log(1 + math.exp(-2.0)))  # confidence 1: plain DPO
    assert expected[2] == pytest.approx(math.log(2))


def test_soft_dpo_equals_dpo_at_full_confidence_and_stands_still_at_half(tmp_path: Path, tiny: Path) -> None:
    import json

    def losses(name: str, algorithm: str, confidence: float) -> list[float]:
        run_dir = write_exports(tmp_path / name, confidence=confidence)
        summary = run_training("dpo", config(tiny, rl_algorithm=algorithm, max_steps=6), run_dir)
        rows = json.loads((Path(summary["output_dir"]) / "metrics.json").read_text())
        return [float(r["loss"]) for r in rows if "loss" in r]

    hard = losses("hard", "dpo", 1.0)
    soft = losses("soft", "soft_dpo", 1.0)
    assert soft == pytest.approx(hard, abs=1e-5)
    undecided = losses("half", "soft_dpo", 0.5)
    assert undecided == pytest.approx([math.log(2)] * len(undecided), abs=1e-5)  # a coin-flip label teaches nothing


def test_bad_input_fails_before_training(tmp_path: Path, tiny: Path) -> None:
    run_dir = write_exports(tmp_path)
    pl.DataFrame({"text": ["a"]}).write_parquet(tmp_path / "bad.parquet")
    with pytest.raises(ConfigError, match="sft training needs the columns messages; missing messages"):
        run_training("sft", config(tiny, sft_data=str(tmp_path / "bad.parquet")), run_dir)
    with pytest.raises(ConfigError, match="neither a Hugging Face model folder"):
        run_training("sft", config(tmp_path / "nowhere"), run_dir)
    with pytest.raises(ConfigError, match=r"every reward row is longer than train\.max_length=16"):
        run_training("reward", config(tiny, max_length=16), run_dir)
    with pytest.raises(ConfigError, match="no training data here"):
        run_training("dpo", config(tiny, dpo_data=str(tmp_path / "missing.parquet")), run_dir)
    assert config(tiny, rl_algorithm="PPO").rl_algorithm == "ppo"  # through OpenRLHF: tests/test_reward_server.py


def test_cli_train_and_clear_errors(tmp_path: Path, tiny: Path) -> None:
    run_dir = write_exports(tmp_path)
    out = cai("train", "sft", "--model", str(tiny), "--run-dir", str(run_dir), "--max-steps", "3", "--full",
              "--set", "train.max_length=128", timeout=300)
    assert out.returncode == 0, out.stderr
    assert "train/sft (sft, cpu, float32): 3 steps" in out.stderr
    bad = cai("train", "dpo", "--model", str(tiny), "--run-dir", str(run_dir), "--rl-algorithm", "sac")
    assert bad.returncode == 2 and "unknown rl_algorithm 'sac'" in bad.stderr
    assert "grpo" in bad.stderr and "Traceback" not in bad.stderr
    wrong = cai("train", "sft", "--model", str(tmp_path), "--run-dir", str(run_dir))
    assert wrong.returncode == 2 and "neither a Hugging Face model folder" in wrong.stderr


@pytest.mark.slow
def test_sft_steps_on_the_embedded_smollm2_from_its_gguf(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from cai_async.train.models import load_model

    run_dir = write_exports(tmp_path, repeat=1)
    summary = run_training("sft", TrainConfig(model="embedded", max_steps=2, batch_size=2, max_length=128,
                                              merge=True), run_dir)
    assert summary["steps"] == 2 and summary["first_loss"] > 0
    out = Path(summary["output_dir"])
    assert (out / "adapter_model.safetensors").is_file() and (Path(summary["merged_dir"]) / "config.json").is_file()
    reloaded = PeftModel.from_pretrained(load_model("embedded"), out)  # the adapter on the de-quantized GGUF
    assert sum(p.numel() for p in reloaded.parameters()) > 100_000_000  # SmolLM2-135M with its adapter
    merged = AutoModelForCausalLM.from_pretrained(summary["merged_dir"])  # a plain HF folder, no GGUF needed
    assert merged.config.model_type == "llama"


@pytest.mark.parametrize("algorithm", ["grpo", "rloo", "online_dpo"])
def test_online_rl_with_the_constitutional_reward(tmp_path: Path, tiny: Path, server: Any, algorithm: str) -> None:
    import json

    from cai_async import EngineConfig

    server.configure(prefer="A")  # the critic answers "(A) yes" with p = 0.9 for every completion
    run_dir = write_exports(tmp_path, repeat=1)
    engine = EngineConfig.model_validate({"groups": {"critic": [{"backend": "openai", "model": "m",
                                                                 "base_url": server.base_url}]}, "progress": "off"})
    summary = run_training("rl", config(tiny, rl_algorithm=algorithm, max_steps=2, num_generations=4,
                                        max_completion_length=6, rl_ensemble=2), run_dir, engine_config=engine)
    assert summary["algorithm"] == algorithm and summary["steps"] == 2
    # steps × completions per step (GRPO/RLOO: 4 generations; online DPO: 4 prompts × 2 samples) × principles
    per_step = 4 * 2 if algorithm == "online_dpo" else 4
    assert summary["reward_judgments"] == 2 * per_step * 2
    assert server.stats()["ok"] <= summary["reward_judgments"]  # repeated judgments come from the cache
    rows = json.loads((Path(summary["output_dir"]) / "metrics.json").read_text())
    key = "objective/scores" if algorithm == "online_dpo" else "rewards/constitutional_reward/mean"
    rewards = [float(r[key]) for r in rows if key in r]
    assert rewards and all(r == pytest.approx(0.9, abs=1e-3) for r in rewards)


@pytest.mark.parametrize("algorithm", ["grpo", "online_dpo"])
def test_online_rl_with_the_trained_reward_model(tmp_path: Path, tiny: Path, algorithm: str) -> None:
    import json

    run_dir = write_exports(tmp_path, repeat=1)
    run_training("reward", config(tiny, max_steps=4), run_dir)  # full finetune: a folder with config.json
    summary = run_training("rl", config(tiny, rl_algorithm=algorithm, reward_from="reward_model", max_steps=2,
                                        num_generations=4, max_completion_length=6), run_dir)
    assert summary["algorithm"] == algorithm and summary["steps"] == 2 and "reward_judgments" not in summary
    rows = json.loads((Path(summary["output_dir"]) / "metrics.json").read_text())
    key = "objective/scores" if algorithm == "online_dpo" else "reward"
    assert any(key in row for row in rows)


def test_online_rl_errors_are_clear(tmp_path: Path, tiny: Path) -> None:
    run_dir = write_exports(tmp_path, repeat=1)
    with pytest.raises(ConfigError, match="needs the recipe's engine"):
        run_training("rl", config(tiny, rl_algorithm="grpo"), run_dir)
    with pytest.raises(ConfigError, match="no trained reward model"):
        run_training("rl", config(tiny, rl_algorithm="grpo", reward_from="reward_model"), run_dir)


def test_data_parallel_training_on_two_processes(tmp_path: Path, tiny: Path, free_port: int) -> None:
    """The multi-GPU path (DDP through torch.distributed, which ``accelerate launch --multi_gpu`` runs) on two
    CPU processes over gloo: each trains its share of every step, the main process alone writes the model,
    both finish cleanly, and the model loads back."""
    import json
    import subprocess
    import sys

    import yaml

    run_dir = write_exports(tmp_path / "run")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"run_dir": str(run_dir), "train": {
        "model": str(tiny), "max_steps": 3, "batch_size": 2, "max_length": 128, "learning_rate": 2e-2,
        "lora": {"enabled": False}, "device": "cpu"}}))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port), "-m", "cai_async.cli", "train", "sft", str(recipe)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr.count("train/sft (sft, cpu") == 2  # both processes trained and reported
    summary = json.loads((run_dir / "train" / "sft" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["global_batch"] == 4 and summary["steps"] == 3
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(run_dir / "train" / "sft").num_parameters() > 0


def test_a_trained_model_serves_through_the_transformers_backend(tmp_path: Path, tiny: Path) -> None:
    import anyio

    from backends import BackendSettings, ChatRequest, ScoreRequest, create_backend

    run_dir = write_exports(tmp_path)
    summary = run_training("sft", config(tiny, max_steps=120, learning_rate=3e-2), run_dir)
    backend = create_backend("transformers", BackendSettings(endpoint="after", model=summary["output_dir"]))

    async def ask() -> tuple[str, dict[str, float]]:
        chat = await backend.chat(ChatRequest([{"role": "user", "content": QUESTIONS[0]}], max_tokens=12))
        score = await backend.score(ScoreRequest([{"role": "user", "content": "Pick (A) or (B)."}]))
        return chat.text, score.probs

    text, probs = anyio.run(ask)
    assert text.startswith("I can't help")  # the trained model answers as it was taught
    assert sum(probs.values()) == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="not a model folder"):
        create_backend("transformers", BackendSettings(endpoint="x", model=str(tmp_path)))
