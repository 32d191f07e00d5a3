"""Configuration of the inference-time guard (recipe key ``guard``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["DirectionPolicy", "GuardConfig", "StreamPolicy", "UpstreamConfig"]


class DirectionPolicy(BaseModel):
    """What the guard does with one direction of traffic (the request, or the answer)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    action: Literal["block", "flag", "revise"] = "block"
    """block: answer with a refusal naming the principle (``finish_reason: content_filter``); flag: pass it
    through, marked; revise (answers only): run the constitution's critique → revision on it first."""
    threshold: float = Field(default=0.5, gt=0, le=1)
    """A principle counts as violated when the judge's P(violation) is at least this."""
    fail: Literal["open", "closed"] = "open"
    """When the judge cannot answer in ``judge_timeout_s`` (down, overloaded): let the traffic through
    (open) or block it (closed)."""


class StreamPolicy(BaseModel):
    """How a streamed answer is checked as it grows."""

    model_config = ConfigDict(extra="forbid")

    check_every_chunks: int = Field(default=16, ge=1)
    """Check the answer so far every N streamed chunks (about N tokens), and at the end."""
    hold_back_chars: int = Field(default=160, ge=0)
    """Text this close to the end of what was checked is held back, so the start of a violation that a later
    check finds has not reached the client yet."""


class UpstreamConfig(BaseModel):
    """The OpenAI-compatible server the proxy guards."""

    model_config = ConfigDict(extra="forbid")

    base_url: str = ""
    """…/v1 of the upstream."""
    api_key_env: str | None = None
    """Name of the variable holding the upstream's key; unset: the client's ``Authorization`` is passed on."""
    timeout_s: float = Field(default=300.0, gt=0)


class GuardConfig(BaseModel):
    """The guard: which principles it checks, with which judge, and what it does per direction."""

    model_config = ConfigDict(extra="forbid")

    principles: str = "harmless"
    """A comparison set or a constitution (built-in name or file): its principles are what is checked, and
    the rules they carry are the first tier."""
    constitution: str = "seed"
    """The constitution whose critique → revision the ``revise`` action runs."""
    judge_role: str = "critic"
    """The engine group that judges (and critiques and revises, for ``revise``)."""
    ensemble: int | None = Field(default=None, ge=1)
    """Principles the judge is asked per check (by weight); default: all of them."""
    judge_timeout_s: float = Field(default=30.0, gt=0)
    input: DirectionPolicy = Field(default_factory=DirectionPolicy)
    output: DirectionPolicy = Field(default_factory=DirectionPolicy)
    stream: StreamPolicy = Field(default_factory=StreamPolicy)
    upstream: UpstreamConfig = Field(default_factory=UpstreamConfig)
    host: str = "127.0.0.1"
    port: int = Field(default=8100, ge=0, le=65535)
    api_key_env: str | None = None
    """Name of the variable holding the key the proxy's own clients must send (``Authorization: Bearer …``)."""
    revise_max_tokens: int = Field(default=256, ge=1)

    @model_validator(mode="after")
    def _revise_answers_only(self) -> GuardConfig:
        if self.input.action == "revise":
            raise ValueError("input.action: revise applies to answers; use block or flag for requests")
        return self
