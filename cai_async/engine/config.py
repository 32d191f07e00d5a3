"""Typed engine configuration: endpoints, groups by role, retries, circuit breaker, cache, budget."""

from __future__ import annotations

import os
from typing import Any, ClassVar, Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from backends.deprecation import renamed
from backends.errors import ConfigError
from backends.options import BatchOptions, parse_options
from backends.registry import DEFAULT_BACKEND, BackendSettings, batch_backend, batch_capable, options_model
from backends.strict import StrictModel

__all__ = ["ALWAYS_USED", "JUDGE", "JUDGE_NAMES", "OLD_JUDGE", "BatchOptions", "BreakerConfig", "CacheConfig",
           "EndpointConfig", "EngineConfig", "RetryConfig"]


class EndpointConfig(StrictModel):
    """One model endpoint. Holds the *name* of the API-key variable, never the key."""

    _key_hints: ClassVar[dict[str, str]] = dict.fromkeys(
        ("api_key", "apikey", "api_token", "key"),
        "use api_key_env (the name of the environment variable holding the key; keys never go in files)",
    )
    """What to say of an unknown key that looks like an inline API key."""

    name: str = ""
    backend: str = DEFAULT_BACKEND
    model: str = ""
    base_url: str = ""
    api_key_env: str | None = None
    rpm: float | None = Field(default=None, gt=0, description="requests/minute; unset: learned from headers")
    tpm: float | None = Field(default=None, gt=0, description="tokens/minute; unset: learned from headers")
    learn_limits: bool = True
    slow_start: bool = Field(
        default=False,
        description="with no rpm/tpm configured, send one call first and hold the rest until its rate-limit headers "
        "are read (costs one round trip at start; off: start at full concurrency and learn from the first answers "
        "and any 429s)",
    )
    max_concurrency: int | None = Field(default=None, ge=1, description="calls in flight; unset: the engine's cap")
    weight: float = Field(default=1.0, gt=0)
    price_in: float = Field(default=0.0, ge=0, description="USD per million input tokens")
    price_out: float = Field(default=0.0, ge=0, description="USD per million output tokens")
    timeout_s: float = Field(default=120.0, gt=0)
    mode: Literal["online", "batch"] = Field(
        default="online", description="batch: send the calls through the provider's Batch API (about half price)"
    )
    batch: BatchOptions = Field(default_factory=BatchOptions)
    options: dict[str, Any] = Field(default_factory=dict, description="the backend's options (typed per backend)")

    @field_validator("options")
    @classmethod
    def _known_options(cls, options: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """Check the options against the backend's options model (light to import), so a misspelled one stops
        the run at start; a backend that declares no model (or is unknown: creating it says so) takes them as
        given."""
        backend = info.data.get("backend")
        model = options_model(backend) if isinstance(backend, str) else None
        if model is not None:
            try:
                parse_options(model, options, backend=str(backend))
            except ConfigError as exc:
                raise PydanticCustomError("backend_option", "{problem}", {"problem": str(exc)}) from None
        return options

    @model_validator(mode="after")
    def _batch_needs_openai(self) -> EndpointConfig:
        if self.mode == "batch" and batch_backend(self.backend) is None:
            raise ValueError(
                f"endpoint {self.name or self.model!r}: mode batch needs an OpenAI-compatible endpoint "
                f"(backend {' or '.join(batch_capable())}), not {self.backend!r}; use mode online for local models"
            )
        return self

    @property
    def backend_kind(self) -> str:
        """The registered backend that serves this endpoint: its batch backend (``openai-batch``) in batch mode."""
        return (batch_backend(self.backend) or self.backend) if self.mode == "batch" else self.backend

    @property
    def cache_identity(self) -> str:
        """What a cached answer is tied to: the backend, where it is served and the model. Two endpoints that
        both call their model "default" but serve different weights never share answers; replicas of one
        model each have their own key, and a lookup tries them all."""
        return f"{self.backend}|{self.base_url}|{self.model or self.name}"

    def settings(self, *, state_dir: str | None = None) -> BackendSettings:
        """Backend settings with the API key read from the environment (never stored in config);
        ``state_dir`` is where a backend may keep state across runs (the Batch API's journal)."""
        key = ""
        if self.api_key_env:
            key = os.environ.get(self.api_key_env, "")
            if not key:
                raise ConfigError(
                    f"endpoint {self.name!r}: the environment variable {self.api_key_env} (api_key_env) "
                    f"is not set; export {self.api_key_env}=... before running"
                )
        return BackendSettings(
            endpoint=self.name,
            model=self.model,
            base_url=self.base_url,
            api_key=SecretStr(key),
            timeout_s=self.timeout_s,
            options={**self.options, "batch": self.batch} if self.mode == "batch" else dict(self.options),
            state_dir=state_dir,
            max_concurrency=self.max_concurrency,
        )

    def prices(self, mode: Literal["online", "batch"] | None = None) -> tuple[float, float]:
        """USD per million input and output tokens in ``mode`` (default: the endpoint's own mode)."""
        if (mode or self.mode) == "online":
            return self.price_in, self.price_out
        price_in = self.batch.price_in if self.batch.price_in is not None else self.price_in / 2
        price_out = self.batch.price_out if self.batch.price_out is not None else self.price_out / 2
        return price_in, price_out

    def cost(self, prompt_tokens: int, completion_tokens: int, mode: Literal["online", "batch"] | None = None) -> float:
        """Price of a call in USD (batch prices in batch mode)."""
        price_in, price_out = self.prices(mode)
        return (prompt_tokens * price_in + completion_tokens * price_out) / 1_000_000


class RetryConfig(StrictModel):
    """Retry policy: exponential backoff with jitter, ``Retry-After`` honoured, attempt and time caps.

    A ``Retry-After`` (or a wait learned from the rate-limit headers) longer than ``max_wait_s`` is a *horizon*:
    the endpoint takes no calls until then and its calls go to the group's other endpoints at once; with none
    left, ``long_wait`` says whether to wait (one line, then a countdown in the progress) or stop (exit 4).
    """

    max_attempts: int = Field(default=8, ge=1)
    max_time_s: float = Field(default=600.0, gt=0)
    initial_s: float = Field(default=0.25, ge=0)
    max_wait_s: float = Field(default=30.0, ge=0)
    long_wait: Literal["wait", "stop"] = Field(
        default="wait", description="a group whose every endpoint waits past max_wait_s: wait visibly, or stop"
    )


class BreakerConfig(StrictModel):
    """Circuit breaker and endpoint health. After ``failures`` consecutive failures an endpoint cools off for
    ``cooloff_s``; when they were failures of the endpoint itself (connection failures, timeouts, answers that are
    not a whole JSON body: ``backends.errors.EndpointFault``) it is *down* (with their cause) and gets one probe
    call every ``probe_s``. A group whose every endpoint stays down for ``down_grace_s`` stops the stage
    (exit 4; a rerun resumes)."""

    failures: int = Field(default=5, ge=1)
    cooloff_s: float = Field(default=15.0, ge=0)
    probe_s: float = Field(default=2.0, gt=0, description="seconds between probe calls to a down endpoint")
    down_grace_s: float = Field(default=10.0, ge=0, description="how long a whole group may be down before stopping")


class CacheConfig(StrictModel):
    """Persistent request cache (SQLite, WAL); ``path`` defaults to ``<run dir>/cache.sqlite``."""

    enabled: bool = True
    path: str | None = None


JUDGE = "judge"
"""The group that critiques, labels and judges (the AI feedback); without one, the policy does."""
OLD_JUDGE = "critic"
"""The judge group's former name, still accepted."""
JUDGE_NAMES = (JUDGE, OLD_JUDGE)
"""Either name of the judge group."""
ALWAYS_USED = frozenset({"policy", *JUDGE_NAMES})
"""The groups a stage may ask without naming them: the policy, and the judge (which falls back to it)."""


class EngineConfig(StrictModel):
    """The engine: endpoint groups by role (``policy``, ``judge``…) and shared policies."""

    groups: dict[str, list[EndpointConfig]] = Field(default_factory=dict)
    max_concurrency: int = Field(default=256, ge=1)
    retry: RetryConfig = Field(default_factory=RetryConfig)
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    budget_usd: float | None = Field(default=None, gt=0)
    progress: Literal["auto", "rich", "plain", "off"] = "auto"

    @field_validator("progress", mode="before")
    @classmethod
    def _yaml_booleans(cls, value: Any) -> Any:
        """YAML reads a bare ``off``/``on`` as a boolean; take it as meant."""
        return {False: "off", True: "auto"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _name_endpoints(self) -> EngineConfig:
        seen: set[str] = set()
        for role, endpoints in self.groups.items():
            if not endpoints:
                raise ValueError(f"group {role!r} has no endpoints")
            for index, endpoint in enumerate(endpoints):
                if not endpoint.name:
                    endpoint.name = f"{role}-{index}" if len(endpoints) > 1 else role
                if endpoint.name in seen:
                    raise ValueError(f"endpoint name {endpoint.name!r} is used twice")
                seen.add(endpoint.name)
        return self

    def group(self, role: str) -> list[EndpointConfig]:
        """Endpoints of ``role``. The judge (``judge``, formerly ``critic``: either name finds a group of the
        other, with one line saying so) falls back to ``policy`` when not configured."""
        if role in self.groups:
            return self.groups[role]
        if role in JUDGE_NAMES:
            if OLD_JUDGE in self.groups:
                renamed(OLD_JUDGE, JUDGE, where="engine.groups")
                return self.groups[OLD_JUDGE]
            if JUDGE in self.groups:
                renamed(OLD_JUDGE, JUDGE, where="a recipe's *_role setting")
                return self.groups[JUDGE]
            if "policy" in self.groups:
                return self.groups["policy"]
        raise ConfigError(
            f"no endpoint group {role!r} is configured; add engine.groups.{role} "
            f"(configured: {', '.join(sorted(self.groups)) or 'none'})"
        )

    def public_dict(self) -> dict[str, Any]:
        """The configuration as plain data, safe to write to disk (it holds no secrets by design)."""
        return self.model_dump(mode="json")
