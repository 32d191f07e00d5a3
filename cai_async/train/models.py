"""Model and tokenizer loading for training: a Hugging Face folder, a GGUF file (de-quantized by
transformers), or the embedded SmolLM2. torch and transformers are imported inside the functions."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from backends.errors import ConfigError

__all__ = ["CHATML_TRAINING_TEMPLATE", "load_model", "load_tokenizer", "resolve_model", "trained_reward_model"]

CHATML_TRAINING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n@SYSTEM@<|im_end|>\n{% endif %}"
    "{% if message['role'] == 'assistant' %}<|im_start|>assistant\n{% generation %}{{ message['content'] }}"
    "<|im_end|>{% endgeneration %}\n"
    "{% else %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""ChatML with ``{% generation %}`` markers, for ChatML models (SmolLM2, Qwen…) whose own template lacks them, so
the loss can be put on assistant tokens only."""


_GENERATION = re.compile(r"{%-?\s*generation\s*-?%}")
_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system(?:\n|\\n)([^<'\"]+)<\|im_end\|>")


def resolve_model(spec: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """``(folder, gguf file name or None)`` for a model spec; errors say what a model path must be."""
    if spec == "embedded":
        from backends.llamacpp import embedded_model_path

        path = embedded_model_path()
        return str(path.parent), path.name
    path = Path(spec)
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name
    if path.is_dir():
        if gguf_file:
            if not (path / gguf_file).is_file():
                raise ConfigError(f"train.gguf_file: {path / gguf_file} not found")
            return str(path), gguf_file
        if (path / "config.json").is_file():
            return str(path), None
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(path), ggufs[0].name
    raise ConfigError(
        f"train.model {spec!r} is neither a Hugging Face model folder (with config.json) nor a .gguf file; "
        "use a local folder, a .gguf path, or 'embedded'"
    )


def trained_reward_model(run_dir: Path) -> Path:
    """The reward model the run's reward stage trained (its ``merged`` folder when there is one)."""
    folder = run_dir / "train" / "reward"
    model = folder / "merged" if (folder / "merged").is_dir() else folder
    if not (model / "config.json").is_file():
        raise ConfigError(f"{model}: no trained reward model with config.json; train the reward stage with "
                          "train.merge: true (or full finetuning) first")
    return model


def load_tokenizer(spec: str, gguf_file: str | None = None) -> Any:
    """The tokenizer, with a pad token and, for ChatML models without generation markers, a training template."""
    from transformers import AutoTokenizer

    folder, gguf = resolve_model(spec, gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    template = tokenizer.chat_template or ""
    if "<|im_start|>" in template and not _GENERATION.search(template):
        default_system = _DEFAULT_SYSTEM.search(template)
        system = default_system.group(1) if default_system else "You are a helpful AI assistant."
        tokenizer.chat_template = CHATML_TRAINING_TEMPLATE.replace("@SYSTEM@", system)
    if not tokenizer.chat_template:
        raise ConfigError(f"train.model {spec!r} has no chat template; conversational training data needs one")
    return tokenizer


def load_model(
    spec: str, *, gguf_file: str | None = None, task: Literal["causal", "reward"] = "causal",
    dtype: Any = None,
) -> Any:
    """The model for ``task``; a GGUF model is de-quantized and stripped of its quantization config so that
    ``save_pretrained`` works."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    folder, gguf = resolve_model(spec, gguf_file)
    kwargs: dict[str, Any] = {"gguf_file": gguf} if gguf else {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        if task == "reward":
            model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"train.model {spec!r}: cannot load ({exc})") from None
    if gguf:  # de-quantized weights: drop the GGUF quantization marks so training and save_pretrained accept it
        model.config.__dict__.pop("quantization_config", None)
        model.hf_quantizer = None
        model.is_quantized = False
    if task == "reward" and model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model
