"""``cai train guard``: gather the examples (the run dir's data, the bundled public prompts, requests generated per
principle through the engine) and train the guard classifier with its calibration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio

from backends.errors import ConfigError
from cai_async.engine import Engine, EngineConfig
from cai_async.guard.classifier import MIN_AUC, MIN_SPREAD, train_guard_classifier
from cai_async.guard.config import GuardConfig
from cai_async.guard.core import guard_principles
from cai_async.guard.training_data import (
    Example,
    audit_examples,
    generated_examples,
    public_examples,
    run_dir_examples,
)

__all__ = ["fit_guard_classifier", "guard_examples"]


def guard_examples(run_dir: str | Path, config: GuardConfig,
                   engine_config: EngineConfig | None = None) -> list[Example]:
    """The run dir's examples, the audited checks of ``guard.train.audit_dirs``, the public ones
    (``guard.train.public``) and generated ones (``generate`` > 0, through ``engine_config``'s ``generate_role``
    group; the engine's cache makes a rerun ask nothing again)."""
    train = config.train
    examples = run_dir_examples(run_dir)
    for folder in train.audit_dirs:
        if not (Path(folder) / "guard" / "audits").is_dir():
            raise ConfigError(f"guard.train.audit_dirs: {folder} holds no audited checks (guard/audits); serve the "
                              "guard there with guard.classifier.audit > 0 and keep_text: true")
        examples += audit_examples(folder)
    if train.public:
        examples += public_examples()
    if train.generate:
        if engine_config is None:
            raise ConfigError("guard.train.generate needs an engine (a recipe with the generate_role group)")
        principles = guard_principles(config.principles)

        async def generate() -> list[Example]:
            async with Engine(engine_config, run_dir=run_dir) as engine:
                engine.group(train.generate_role)
                return await generated_examples(engine, train.generate_role, principles, train.generate,
                                                 seed=train.seed)

        examples += anyio.run(generate)
    if not examples:
        raise ConfigError(f"{run_dir}: nothing to train the guard classifier on (no sl/, helpful/, guard/audits/ or "
                          "exports/dpo.parquet here); run the sl and label stages first, or set guard.train.public: "
                          "true")
    return examples


def fit_guard_classifier(run_dir: str | Path, config: GuardConfig, engine_config: EngineConfig | None = None, *,
                         min_spread: float = MIN_SPREAD, min_auc: float = MIN_AUC) -> dict[str, Any]:
    """Train the classifier on :func:`guard_examples` into ``guard.train.output_dir`` (default
    RUN_DIR/guard/classifier); return its calibration and training figures. One whose held-out scores spread less
    than ``min_spread`` or whose held-out AUC is below ``min_auc`` is not written
    (:class:`~cai_async.guard.classifier.ClassifierRefused`)."""
    out = Path(config.train.output_dir) if config.train.output_dir else Path(run_dir) / "guard" / "classifier"
    examples = guard_examples(run_dir, config, engine_config)
    return train_guard_classifier(config.train, examples, out, label=Path(config.principles).stem,
                                  min_spread=min_spread, min_auc=min_auc)
