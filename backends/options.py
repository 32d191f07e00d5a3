"""Typed options of the built-in backends (an endpoint's ``options:``, and ``batch:`` in batch mode), in a module
that imports only pydantic: the engine's config validates them when it is loaded, without importing llama.cpp or
torch, and each backend parses its ``settings.options`` with the same model. Unknown keys are errors."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, Field, StrictBool, ValidationError

from backends.errors import ConfigError
from backends.strict import StrictModel

__all__ = [
    "BackendOptions",
    "BatchOptions",
    "LlamaCppOptions",
    "OpenAIBatchOptions",
    "OpenAIOptions",
    "TransformersOptions",
    "parse_options",
]

OptionsT = TypeVar("OptionsT", bound=BaseModel)


class BackendOptions(StrictModel):
    """Base of backend options: unknown keys are rejected."""


class OpenAIOptions(BackendOptions):
    """Options of the ``openai`` backend (any OpenAI-compatible ``/v1/chat/completions`` endpoint)."""

    top_logprobs: int = Field(default=20, ge=0, description="alternatives asked for when scoring choices")
    score_fallback: Literal["error", "sample"] = Field(
        default="error", description="an answer without logprobs: fail, or sample the answer score_samples times"
    )
    score_samples: int = Field(default=8, ge=1, description="samples per scoring call with score_fallback: sample")
    prefill: bool = Field(default=False, description="send the answer prefix as an assistant turn to continue (vLLM)")
    max_connections: int = Field(default=0, ge=0, description="pooled connections; 0: unlimited (the engine bounds)")
    slow_body_s: float = Field(
        default=8.0, gt=0, description="an answer whose body is still coming this long after its headers (a server "
        "trickling it) is said in one line, naming the endpoint's timeout_s",
    )


class BatchOptions(BackendOptions):
    """How an endpoint in ``mode: batch`` uses the provider's Batch API (``/v1/files`` + ``/v1/batches``).

    Requests are collected into rounds: a batch is submitted once no new request has come for ``linger_s``
    (every chain that is ready has asked for its next step), or when it is full. Limits default to OpenAI's:
    50,000 requests and 200 MB per input file. Prices default to half the online ones (OpenAI's batch discount).
    """

    max_requests: int = Field(default=50_000, ge=1, description="requests per batch; larger rounds are split")
    max_file_mb: float = Field(default=190.0, gt=0, description="input file size per batch (provider: 200 MB)")
    completion_window: Literal["24h"] = "24h"
    linger_s: float = Field(default=2.0, ge=0, description="quiet time that closes a round")
    poll_initial_s: float = Field(default=5.0, gt=0)
    poll_max_s: float = Field(default=60.0, gt=0)
    max_attempts: int = Field(default=3, ge=1, description="batches a failed or expired request may go through")
    request_retries: int = Field(default=6, ge=1, description="tries of each upload/create/poll/download call")
    in_flight: int = Field(default=10_000, ge=1, description="items (chains, pairs) kept waiting on batches")
    price_in: float | None = Field(default=None, ge=0, description="USD per million input tokens; unset: half online")
    price_out: float | None = Field(default=None, ge=0, description="USD per million output tokens; unset: half")


class OpenAIBatchOptions(OpenAIOptions):
    """Options of the ``openai-batch`` backend: the endpoint's ``openai`` options (``top_logprobs`` and ``prefill``
    apply) and its ``batch:`` section."""

    batch: BatchOptions = Field(default_factory=BatchOptions)


class LlamaCppOptions(BackendOptions):
    """Options of the in-process ``llamacpp`` backend (see :class:`backends.llamacpp.LlamaCppBackend`)."""

    n_ctx: int = Field(default=2048, ge=1, description="tokens per sequence")
    n_threads: int | None = Field(default=None, ge=1, description="decode threads; unset: the cores this process has")
    n_threads_batch: int | None = Field(default=None, ge=1, description="prompt evaluation threads; unset: n_threads")
    score_method: Literal["logits", "logprobs"] = "logits"
    batching: StrictBool = Field(default=True, description="concurrent calls share one decode loop")
    flash_attn: StrictBool | None = Field(default=None, description="flash attention; unset: on when batching")
    weights: Literal["auto", "as-is", "f16"] = Field(
        default="auto", description="auto: batching ≥ 4 sequences, an F16 copy of a small Q4_1 model (batched kernels)")
    batch_tokens: int = Field(default=512, ge=1, description="tokens per decode step (batching)")


class TransformersOptions(BackendOptions):
    """Options of the in-process ``transformers`` backend (see :class:`backends.hf.TransformersBackend`)."""

    batch_size: int | None = Field(default=None, ge=1, description="calls run together; unset: max_concurrency or 8")
    batch_window_s: float = Field(default=0.01, ge=0, description="how long a batch waits for company")


def _problem(model: type[BaseModel], error: Mapping[str, Any], backend: str) -> str:
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] != "extra_forbidden":
        return f"option {key}: {error['msg']}"
    allowed = sorted(model.model_fields)
    if len(error["loc"]) > 1:  # inside a nested section (batch.<key>)
        inner = model.model_fields[str(error["loc"][0])].annotation
        allowed = sorted(inner.model_fields) if isinstance(inner, type) and issubclass(inner, BaseModel) else []
    close = difflib.get_close_matches(str(error["loc"][-1]), allowed, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown option {key} for backend {backend}{hint}; allowed options: {', '.join(allowed)}"


def parse_options(
    model: type[OptionsT], options: Mapping[str, Any], *, backend: str, endpoint: str = ""
) -> OptionsT:
    """``options`` parsed into ``model``; a misspelled key or a bad value is a :class:`ConfigError` naming the key
    and the allowed options."""
    try:
        return model.model_validate(options)
    except ValidationError as exc:
        where = f"endpoint {endpoint!r}: " if endpoint else ""
        problems = "; ".join(_problem(model, err, backend) for err in exc.errors())
        raise ConfigError(f"{where}{problems}") from None
