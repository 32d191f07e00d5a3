"""GPU training throughput: the SFT and soft-label DPO stages of ``recipes/hosted-gpu.yaml`` on a ~0.5B-parameter
Llama built from a config (random initialisation; throughput only), for a few hundred steps each, reporting
tokens/s and peak GPU memory. Data: hh-rlhf red-team prompts with synthetic responses, so every row has a
realistic length. Needs a CUDA GPU; nothing is downloaded.

    python bench/train_gpu.py --data-dir DIR_WITH_hh_rlhf_prompts [--sft-steps 300] [--dpo-steps 200]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build_model(folder: Path, prompts: list[str], *, small: bool = False) -> int:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from cai_async.train.models import CHATML_TRAINING_TEMPLATE

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(prompts * 3, trainers.BpeTrainer(
        vocab_size=16384, special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<|im_end|>")
    fast.chat_template = CHATML_TRAINING_TEMPLATE.replace("@SYSTEM@", "You are a helpful AI assistant.")
    fast.save_pretrained(folder)
    hidden, layers = (64, 2) if small else (1408, 24)  # ~0.52B parameters with the 16k vocabulary
    config = LlamaConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                         num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4,
                         max_position_embeddings=2048,
                         pad_token_id=fast.pad_token_id, eos_token_id=fast.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def build_data(run_dir: Path, prompts: list[str], answers: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    exports = run_dir / "exports"
    exports.mkdir(parents=True, exist_ok=True)
    rows = [(p, answers[i % len(answers)], answers[(i * 7 + 3) % len(answers)]) for i, p in enumerate(prompts)]
    pq.write_table(pa.Table.from_pylist([
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": good}]} for p, good, _ in rows
    ]), exports / "sft.parquet")
    pq.write_table(pa.Table.from_pylist([
        {"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": good}],
         "rejected": [{"role": "assistant", "content": bad}], "confidence": 0.6 + 0.4 * (i % 5) / 4}
        for i, (p, good, bad) in enumerate(rows)
    ]), exports / "dpo.parquet")


def main() -> None:
    import torch
    import yaml

    from cai_async.train.config import TrainConfig
    from cai_async.train.data import load_training_data, sequence_lengths
    from cai_async.train.models import load_tokenizer
    from cai_async.train.run import run_training

    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/cai-gpu-bench"))
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--dpo-steps", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--cpu-smoke", action="store_true", help="2 steps of a tiny model on the CPU (checks only)")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.cpu_smoke:
        raise SystemExit("no CUDA GPU: this benchmark reports GPU throughput only")
    lines = (args.data_dir / "harmless_base_test_first_human_turns.jsonl").read_text().splitlines()
    prompts = [json.loads(line)["prompt"] for line in lines]
    tasks = [json.loads(line) for line in (args.data_dir / "seed_tasks.jsonl").read_text().splitlines()]
    answers = [" ".join([t["instruction"], *(i["output"] for i in t["instances"])]) * 3 for t in tasks]
    model_dir, run_dir = args.work / "model", args.work / "run"
    params = build_model(model_dir, prompts + answers, small=args.cpu_smoke)
    build_data(run_dir, prompts, answers)
    recipe = yaml.safe_load((ROOT / "recipes" / "hosted-gpu.yaml").read_text())["train"]
    if args.cpu_smoke:
        recipe.update(precision="fp32", device="cpu", gradient_checkpointing=False, logging_steps=1)
        args.sft_steps = args.dpo_steps = 2
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    results: dict[str, Any] = {"gpu": gpu, "params": params, "stages": {}}
    print(f"{results['gpu']}: Llama {params / 1e6:.0f}M params (random init), vocab 16k, bf16")
    tokenizer = load_tokenizer(str(model_dir))
    for label, stage, steps, changes in (
        ("sft-lora", "sft", args.sft_steps, {}),
        ("sft-full", "sft", args.sft_steps, {"lora": {"enabled": False}, "learning_rate": 1e-5}),
        ("soft_dpo-lora", "dpo", args.dpo_steps, {"rl_algorithm": "soft_dpo"}),
    ):
        config = TrainConfig.model_validate({**recipe, "model": str(model_dir), "max_steps": steps,
                                             "output_dir": str(args.work / label), "stages": [stage], **changes})
        data = load_training_data(run_dir / "exports" / ("sft.parquet" if stage == "sft" else "dpo.parquet"),
                                  "sft" if stage == "sft" else "soft_dpo")
        lengths = sequence_lengths(data.select(range(512)), tokenizer,
                                   ("messages",) if stage == "sft" else ("chosen", "rejected"))
        mean_len = min(sum(lengths) / len(lengths), config.max_length)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        summary = run_training(stage, config, run_dir)
        sequences = summary["steps"] * config.batch_size * config.gradient_accumulation_steps
        sequences *= 2 if stage == "dpo" else 1  # chosen and rejected
        tokens = sequences * mean_len
        metrics = json.loads((Path(summary["output_dir"]) / "metrics.json").read_text())
        runtime = next((float(r["train_runtime"]) for r in metrics if "train_runtime" in r), summary["seconds"])
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        row = {"steps": summary["steps"], "batch": config.batch_size, "max_length": config.max_length,
               "mean_tokens_per_sequence": round(mean_len, 1), "train_runtime_s": round(runtime, 2),
               "tokens_per_s": round(tokens / runtime), "peak_memory_gib": round(peak, 2),
               "first_loss": summary["first_loss"], "last_loss": summary["last_loss"],
               "gradient_checkpointing": config.gradient_checkpointing, "lora": config.lora.enabled}
        results["stages"][label] = row
        print(f"  {label:<14} {row['steps']} steps  {row['train_runtime_s']:7.1f} s  {row['tokens_per_s']:8d} tok/s  "
              f"peak {row['peak_memory_gib']:6.2f} GiB  loss {row['first_loss']} → {row['last_loss']}", flush=True)
        if args.out:  # after every stage, so a run cut short still reports what finished
            args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
