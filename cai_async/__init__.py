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
from cai_async.prompts import PromptRow, load_prompts
from cai_async.recipes import Recipe, load_recipe, run_recipe
from cai_async.stages import GenerateConfig, run_generate
from cai_async.store import ShardWriter, read_shards, write_parquet_atomic

__version__ = "0.1.0"

__all__ = [
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
    "EndpointConfig",
    "Engine",
    "EngineConfig",
    "GenerateConfig",
    "PermanentError",
    "PromptRow",
    "RateLimited",
    "Recipe",
    "RequestCache",
    "RetryConfig",
    "ScoreRequest",
    "ScoreResult",
    "ShardWriter",
    "TransientError",
    "Usage",
    "__version__",
    "apply_overrides",
    "available_backends",
    "create_backend",
    "load_config",
    "load_prompts",
    "load_recipe",
    "read_mapping",
    "read_shards",
    "register_backend",
    "run_generate",
    "run_recipe",
    "write_parquet_atomic",
]
