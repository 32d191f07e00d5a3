"""cai-async: Constitutional AI data generation, feedback and training over an anyio engine.

The public API is flat: everything in ``__all__`` is importable from ``cai_async``. Names are imported on first
use, so ``import cai_async.train`` (or the CLI) does not pull in Polars, aiohttp or llama.cpp it does not need.
The API is written once, in ``_API`` (module -> names); ``__all__`` and the lazy imports are derived from it. The
``TYPE_CHECKING`` imports say the same for type checkers; ``tests/test_api.py`` checks that they agree and prints
the block to paste when they do not.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from backends import (
        AuthenticationFailed as AuthenticationFailed,
        Backend as Backend,
        BackendError as BackendError,
        BackendTraits as BackendTraits,
        BaseBackend as BaseBackend,
        BudgetExceeded as BudgetExceeded,
        CaiError as CaiError,
        ChatRequest as ChatRequest,
        ChatResult as ChatResult,
        ConfigError as ConfigError,
        NoChoiceFound as NoChoiceFound,
        PermanentError as PermanentError,
        RateLimited as RateLimited,
        ScoreRequest as ScoreRequest,
        ScoreResult as ScoreResult,
        StrictModel as StrictModel,
        TransientError as TransientError,
        Usage as Usage,
        available_backends as available_backends,
        create_backend as create_backend,
        register_backend as register_backend,
    )
    from cai_async.card import (
        card_data as card_data,
        write_card as write_card,
    )
    from cai_async.configio import (
        apply_overrides as apply_overrides,
        load_config as load_config,
        read_mapping as read_mapping,
    )
    from cai_async.constitution import (
        ComparisonPrinciple as ComparisonPrinciple,
        ComparisonSet as ComparisonSet,
        Constitution as Constitution,
        ContrastExample as ContrastExample,
        DrawMode as DrawMode,
        FewShotExample as FewShotExample,
        GuardRules as GuardRules,
        Principle as Principle,
        draw_passes as draw_passes,
        draw_principles as draw_principles,
    )
    from cai_async.constitution_io import (
        builtin_comparison_sets as builtin_comparison_sets,
        builtin_constitutions as builtin_constitutions,
        constitution_from_mapping as constitution_from_mapping,
        load_comparison_set as load_comparison_set,
        load_constitution as load_constitution,
        save_constitution as save_constitution,
    )
    from cai_async.engine import (
        BatchReport as BatchReport,
        BreakerConfig as BreakerConfig,
        CacheConfig as CacheConfig,
        EndpointConfig as EndpointConfig,
        Engine as Engine,
        EngineConfig as EngineConfig,
        RequestCache as RequestCache,
        RetryConfig as RetryConfig,
    )
    from cai_async.evaluation.report import (
        write_report as write_report,
    )
    from cai_async.evaluation.run import (
        EvalConfig as EvalConfig,
        EvalModel as EvalModel,
        eval_metrics as eval_metrics,
        run_eval as run_eval,
    )
    from cai_async.evaluation.suites import (
        load_suite as load_suite,
        refused_by_rule as refused_by_rule,
    )
    from cai_async.exports import (
        ExportConfig as ExportConfig,
        HelpfulMixConfig as HelpfulMixConfig,
        RLExportConfig as RLExportConfig,
        dpo_frame as dpo_frame,
        mix_helpful as mix_helpful,
        pairs_frame as pairs_frame,
        reward_frame as reward_frame,
        sft_frame as sft_frame,
        write_rl_exports as write_rl_exports,
        write_sl_exports as write_sl_exports,
    )
    from cai_async.guard import (
        Guard as Guard,
        GuardConfig as GuardConfig,
        Verdict as Verdict,
        VerdictLog as VerdictLog,
        audit_summary as audit_summary,
        recalibrate_classifier as recalibrate_classifier,
        serve_guard as serve_guard,
    )
    from cai_async.judging import (
        ANSWER_PREFIX as ANSWER_PREFIX,
        CotConfig as CotConfig,
        combine_orders as combine_orders,
        multiple_choice_prompt as multiple_choice_prompt,
        parse_choice as parse_choice,
        proportion as proportion,
        single_response_prompt as single_response_prompt,
        wilson_interval as wilson_interval,
    )
    from cai_async.labelquality import (
        expected_calibration_error as expected_calibration_error,
        human_pairs as human_pairs,
        quality_metrics as quality_metrics,
        run_label_quality as run_label_quality,
    )
    from cai_async.prompts import (
        PromptRow as PromptRow,
        load_prompts as load_prompts,
        parse_conversation as parse_conversation,
    )
    from cai_async.recipes import (
        METHOD_KEYS as METHOD_KEYS,
        Recipe as Recipe,
        RLConfig as RLConfig,
        lift_method_keys as lift_method_keys,
        load_recipe as load_recipe,
        run_eval_stage as run_eval_stage,
        run_recipe as run_recipe,
        run_rl_stage as run_rl_stage,
        run_sl_stage as run_sl_stage,
    )
    from cai_async.redteam import (
        Attack as Attack,
        AttackContext as AttackContext,
        Calls as Calls,
        RedteamConfig as RedteamConfig,
        Seed as Seed,
        SingleTurn as SingleTurn,
        Strategy as Strategy,
        gap_lines as gap_lines,
        load_seeds as load_seeds,
        principle_gaps as principle_gaps,
        register_strategy as register_strategy,
        strategy_names as strategy_names,
        unregister_strategy as unregister_strategy,
    )
    from cai_async.redteam.stage import (
        ATTEMPT_SCHEMA as ATTEMPT_SCHEMA,
        RedteamReport as RedteamReport,
        run_redteam as run_redteam,
    )
    from cai_async.redteam.suggest import (
        Suggestion as Suggestion,
        parse_principle as parse_principle,
        suggest_principle as suggest_principle,
        uncovered_failures as uncovered_failures,
        write_suggestion as write_suggestion,
    )
    from cai_async.runinfo import (
        chain_text as chain_text,
        describe_run as describe_run,
    )
    from cai_async.stages import (
        CHAIN_SCHEMA as CHAIN_SCHEMA,
        EarlyStopConfig as EarlyStopConfig,
        GenerateConfig as GenerateConfig,
        SLConfig as SLConfig,
        SLReport as SLReport,
        clean_revision as clean_revision,
        run_generate as run_generate,
        run_sl as run_sl,
    )
    from cai_async.stages.common import (
        StageReport as StageReport,
    )
    from cai_async.stages.label import (
        LABEL_SCHEMA as LABEL_SCHEMA,
        LabelConfig as LabelConfig,
        Labeller as Labeller,
        LabelReport as LabelReport,
        run_label as run_label,
    )
    from cai_async.stages.pairs import (
        PAIR_SCHEMA as PAIR_SCHEMA,
        PairRow as PairRow,
        PairsConfig as PairsConfig,
        PairsReport as PairsReport,
        load_pairs as load_pairs,
        run_pairs as run_pairs,
    )
    from cai_async.stages.unit import (
        ItemExecutor as ItemExecutor,
        RecipeView as RecipeView,
        StageCommand as StageCommand,
        StageContext as StageContext,
        StageFlag as StageFlag,
        StagePlan as StagePlan,
        StageResult as StageResult,
        StageUnit as StageUnit,
        register_stage as register_stage,
        stage_units as stage_units,
        unregister_stage as unregister_stage,
    )
    from cai_async.store import (
        ShardWriter as ShardWriter,
        read_shards as read_shards,
        write_parquet_atomic as write_parquet_atomic,
    )
    from cai_async.train.config import (
        TrainConfig as TrainConfig,
    )
    from cai_async.train.run import (
        run_training as run_training,
    )

__version__ = "0.1.0"

_API: dict[str, tuple[str, ...]] = {
    "backends": ("AuthenticationFailed", "Backend", "BackendError", "BackendTraits", "BaseBackend", "BudgetExceeded",
        "CaiError", "ChatRequest",
        "ChatResult", "ConfigError", "NoChoiceFound", "PermanentError", "RateLimited", "ScoreRequest", "ScoreResult",
        "StrictModel", "TransientError", "Usage", "available_backends", "create_backend", "register_backend"),
    "cai_async.card": ("card_data", "write_card"),
    "cai_async.configio": ("apply_overrides", "load_config", "read_mapping"),
    "cai_async.constitution": ("ComparisonPrinciple", "ComparisonSet", "Constitution", "ContrastExample",
        "DrawMode", "FewShotExample", "GuardRules", "Principle", "draw_passes", "draw_principles"),
    "cai_async.constitution_io": ("builtin_comparison_sets", "builtin_constitutions", "constitution_from_mapping",
        "load_comparison_set", "load_constitution", "save_constitution"),
    "cai_async.engine": ("BatchReport", "BreakerConfig", "CacheConfig", "EndpointConfig", "Engine", "EngineConfig",
        "RequestCache", "RetryConfig"),
    "cai_async.evaluation.report": ("write_report",),
    "cai_async.evaluation.run": ("EvalConfig", "EvalModel", "eval_metrics", "run_eval"),
    "cai_async.evaluation.suites": ("load_suite", "refused_by_rule"),
    "cai_async.guard": ("Guard", "GuardConfig", "Verdict", "VerdictLog", "audit_summary", "recalibrate_classifier",
        "serve_guard"),
    "cai_async.exports": ("ExportConfig", "HelpfulMixConfig", "RLExportConfig", "dpo_frame", "mix_helpful",
        "pairs_frame", "reward_frame", "sft_frame", "write_rl_exports", "write_sl_exports"),
    "cai_async.judging": ("ANSWER_PREFIX", "CotConfig", "combine_orders", "multiple_choice_prompt", "parse_choice",
        "proportion", "single_response_prompt", "wilson_interval"),
    "cai_async.labelquality": ("expected_calibration_error", "human_pairs", "quality_metrics", "run_label_quality"),
    "cai_async.prompts": ("PromptRow", "load_prompts", "parse_conversation"),
    "cai_async.recipes": ("METHOD_KEYS", "Recipe", "RLConfig", "lift_method_keys", "load_recipe", "run_eval_stage",
        "run_recipe", "run_rl_stage", "run_sl_stage"),
    "cai_async.redteam": ("Attack", "AttackContext", "Calls", "RedteamConfig", "Seed", "SingleTurn", "Strategy",
        "gap_lines", "load_seeds", "principle_gaps", "register_strategy", "strategy_names", "unregister_strategy"),
    "cai_async.redteam.stage": ("ATTEMPT_SCHEMA", "RedteamReport", "run_redteam"),
    "cai_async.redteam.suggest": ("Suggestion", "parse_principle", "suggest_principle", "uncovered_failures",
        "write_suggestion"),
    "cai_async.runinfo": ("chain_text", "describe_run"),
    "cai_async.stages": ("CHAIN_SCHEMA", "EarlyStopConfig", "GenerateConfig", "SLConfig", "SLReport",
        "clean_revision", "run_generate", "run_sl"),
    "cai_async.stages.common": ("StageReport",),
    "cai_async.stages.label": ("LABEL_SCHEMA", "LabelConfig", "Labeller", "LabelReport", "run_label"),
    "cai_async.stages.pairs": ("PAIR_SCHEMA", "PairRow", "PairsConfig", "PairsReport", "load_pairs", "run_pairs"),
    "cai_async.stages.unit": ("ItemExecutor", "RecipeView", "StageCommand", "StageContext", "StageFlag", "StagePlan",
        "StageResult", "StageUnit", "register_stage", "stage_units", "unregister_stage"),
    "cai_async.store": ("ShardWriter", "read_shards", "write_parquet_atomic"),
    "cai_async.train.config": ("TrainConfig",),
    "cai_async.train.run": ("run_training",),
}
"""The public API: each module and the names it gives ``cai_async``."""

_LAZY: dict[str, str] = {name: module for module, names in _API.items() for name in names}

__all__ = sorted([*_LAZY, "__version__"])


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cai_async' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
