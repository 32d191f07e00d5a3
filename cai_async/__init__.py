"""cai-async: Constitutional AI data generation, feedback and training over an anyio engine.

The public API is flat: everything below is importable from ``cai_async``.
"""

from backends import (
    Backend,
    BackendError,
    BudgetExceeded,
    CaiError,
    ChatRequest,
    ChatResult,
    ConfigError,
    PermanentError,
    RateLimited,
    ScoreRequest,
    ScoreResult,
    TransientError,
    Usage,
    available_backends,
    create_backend,
    register_backend,
)
from cai_async.configio import apply_overrides, load_config, read_mapping
from cai_async.constitution import Constitution, DrawMode, FewShotExample, Principle, draw_principles
from cai_async.constitution_io import (
    builtin_constitutions,
    constitution_from_mapping,
    load_constitution,
    save_constitution,
)
from cai_async.engine import (
    BatchReport,
    BreakerConfig,
    CacheConfig,
    EndpointConfig,
    Engine,
    EngineConfig,
    RequestCache,
    RetryConfig,
)
from cai_async.exports import ExportConfig, HelpfulMixConfig, mix_helpful, pairs_frame, sft_frame, write_sl_exports
from cai_async.prompts import PromptRow, load_prompts, parse_conversation
from cai_async.recipes import Recipe, load_recipe, run_recipe, run_sl_stage
from cai_async.runinfo import chain_text, describe_run
from cai_async.stages import (
    CHAIN_SCHEMA,
    EarlyStopConfig,
    GenerateConfig,
    SLConfig,
    SLReport,
    clean_revision,
    run_generate,
    run_sl,
)
from cai_async.store import ShardWriter, read_shards, write_parquet_atomic

__version__ = "0.1.0"

__all__ = [
    "CHAIN_SCHEMA",
    "Backend",
    "BackendError",
    "BatchReport",
    "BreakerConfig",
    "BudgetExceeded",
    "CacheConfig",
    "CaiError",
    "ChatRequest",
    "ChatResult",
    "ConfigError",
    "Constitution",
    "DrawMode",
    "EarlyStopConfig",
    "EndpointConfig",
    "Engine",
    "EngineConfig",
    "ExportConfig",
    "FewShotExample",
    "GenerateConfig",
    "HelpfulMixConfig",
    "PermanentError",
    "Principle",
    "PromptRow",
    "RateLimited",
    "Recipe",
    "RequestCache",
    "RetryConfig",
    "SLConfig",
    "SLReport",
    "ScoreRequest",
    "ScoreResult",
    "ShardWriter",
    "TransientError",
    "Usage",
    "__version__",
    "apply_overrides",
    "available_backends",
    "builtin_constitutions",
    "chain_text",
    "clean_revision",
    "constitution_from_mapping",
    "create_backend",
    "describe_run",
    "draw_principles",
    "load_config",
    "load_constitution",
    "load_prompts",
    "load_recipe",
    "mix_helpful",
    "pairs_frame",
    "parse_conversation",
    "read_mapping",
    "read_shards",
    "register_backend",
    "run_generate",
    "run_recipe",
    "run_sl",
    "run_sl_stage",
    "save_constitution",
    "sft_frame",
    "write_parquet_atomic",
    "write_sl_exports",
]
