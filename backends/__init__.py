"""Model backends for cai-async: the ``Backend`` protocol, its request/result types, the error tree and
a registry that imports backends lazily by name (``openai``, ``openai-batch``, ``llamacpp``, ``transformers``),
and :class:`BaseBackend` with the :class:`BackendTraits` a backend declares to the engine."""

from backends.base import BackendTraits, BaseBackend
from backends.errors import (
    AuthenticationFailed,
    BackendError,
    BrokenAnswer,
    BudgetExceeded,
    CaiError,
    ConfigError,
    EndpointDown,
    EndpointFault,
    InvalidAnswer,
    MissingLogprobs,
    NoChoiceFound,
    PermanentError,
    RateLimited,
    RunStopped,
    TransientError,
    Unreachable,
    redact,
)
from backends.registry import BackendSettings, available_backends, create_backend, register_backend
from backends.scoring import normalize_choice_logprobs
from backends.strict import StrictModel
from backends.types import (
    Backend,
    ChatRequest,
    ChatResult,
    Message,
    RateLimitInfo,
    ScoreRequest,
    ScoreResult,
    Usage,
)

__all__ = [
    "AuthenticationFailed",
    "Backend",
    "BackendError",
    "BackendSettings",
    "BackendTraits",
    "BaseBackend",
    "BrokenAnswer",
    "BudgetExceeded",
    "CaiError",
    "ChatRequest",
    "ChatResult",
    "ConfigError",
    "EndpointDown",
    "EndpointFault",
    "InvalidAnswer",
    "Message",
    "MissingLogprobs",
    "NoChoiceFound",
    "PermanentError",
    "RateLimitInfo",
    "RateLimited",
    "RunStopped",
    "ScoreRequest",
    "ScoreResult",
    "StrictModel",
    "TransientError",
    "Unreachable",
    "Usage",
    "available_backends",
    "create_backend",
    "normalize_choice_logprobs",
    "redact",
    "register_backend",
]
