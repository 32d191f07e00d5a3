"""Configuration of the inference-time guard (recipe key ``guard``)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from backends.strict import StrictModel
from cai_async.engine.config import JUDGE

__all__ = [
    "ClassifierTier",
    "DirectionPolicy",
    "ExternalGuard",
    "GuardConfig",
    "GuardTrainConfig",
    "SizePolicy",
    "StreamPolicy",
    "UpstreamConfig",
]


class DirectionPolicy(StrictModel):
    """What the guard does with one direction of traffic (the request, or the answer)."""

    enabled: bool = True
    action: Literal["block", "flag", "revise"] = "block"
    """block: answer with a refusal naming the principle (``finish_reason: content_filter``); flag: pass it
    through, marked; revise (answers only): run the constitution's critique → revision on it first."""
    threshold: float = Field(default=0.5, gt=0, le=1)
    """A principle counts as violated when the judge's P(violation) is at least this."""
    fail: Literal["open", "closed"] = "open"
    """When the judge cannot answer in ``judge_timeout_s`` (down, overloaded): let the traffic through
    (open) or block it (closed)."""


class StreamPolicy(StrictModel):
    """How a streamed answer is checked as it grows."""

    check_every_chunks: int = Field(default=16, ge=1)
    """Check the answer so far every N streamed chunks (about N tokens), and at the end."""
    hold_back_chars: int = Field(default=160, ge=0)
    """Text this close to the end of what was checked is held back, so the start of a violation that a later
    check finds has not reached the client yet."""


class SizePolicy(StrictModel):
    """How much of an exchange each tier reads, and what happens to one too long to read whole. The rules read
    all of it; the classifier its head and tail; the judge all of it, in windows of ``judge_window_chars`` (a
    phrase on a cut is whole in the next window). An exchange needing more than ``max_windows`` windows, or
    one the judge's endpoint refuses to read (a 4xx such as context too long), is *oversize*."""

    judge_window_chars: int = Field(default=6000, ge=500)
    """Characters of quoted text per judge call: keep it inside the judge model's context (about 4 characters a
    token, plus ~600 for the question)."""
    max_windows: int = Field(default=4, ge=1)
    """Windows the judge reads per check and principle, at most; more text than this is oversize."""
    classifier_chars: int = Field(default=2000, ge=100)
    """Characters the classifier reads: the head and the tail of the exchange."""
    oversize: Literal["block", "truncate", "allow"] = "block"
    """block: a request is answered 400 and an answer replaced by a refusal, both saying why; truncate: every
    tier reads the head and the tail that fit, and the verdict is marked; allow: pass it on unchecked past the
    rules, marked (``cai_guard.tier: oversize``), counted by ``cai guard report``."""


class UpstreamConfig(StrictModel):
    """The OpenAI-compatible server the proxy guards."""

    _key_hints: ClassVar[dict[str, str]] = dict.fromkeys(
        ("api_key", "apikey", "api_token", "key"),
        "use api_key_env (the name of the environment variable holding the key; keys never go in files)",
    )
    """What to say of an unknown key that looks like an inline API key."""


    base_url: str = ""
    """…/v1 of the upstream."""
    api_key_env: str | None = None
    """Name of the variable holding the upstream's key; unset: the client's ``Authorization`` is passed on."""
    timeout_s: float = Field(default=300.0, gt=0)


class ClassifierTier(StrictModel):
    """The classifier tier (``cai train guard`` writes it): decides when its score is at least ``hi`` (a
    violation) or at most ``lo`` (fine); in between, the next tier is asked."""

    path: str
    """The folder ``cai train guard`` wrote (model, tokenizer, ``calibration.json``)."""
    lo: float | None = Field(default=None, ge=0, le=1)
    """Default: the calibrated ``lo`` in ``calibration.json``; likewise ``hi``."""
    hi: float | None = Field(default=None, ge=0, le=1)
    threads: int = Field(default=1, ge=1)
    """torch threads for scoring (a tiny model is fastest on one; more only contend with the proxy)."""
    timeout_s: float = Field(default=5.0, gt=0)
    """A classifier that has not scored within this long (or failed) passes the check on to the next tier."""
    audit: float = Field(default=0.0, ge=0, le=1)
    """Share of checks (picked by a hash of the text, so a rerun picks the same) that the judge decides
    whatever the classifier says, logged with tier ``audit-allow``/``audit-block``/``audit-unsure`` (what the
    classifier would have done) and its score: ``cai guard report`` shows how often the two disagree on this
    traffic, and ``cai guard calibrate`` resets ``lo``/``hi`` from them. The judge's share grows by about this."""
    keep_text: bool = False
    """Also keep the audited checks' text (the conversation, and the answer for output checks) with the judge's
    decision in ``RUN_DIR/guard/audits``, for ``cai train guard`` on that run dir to learn the judge's calls on
    this traffic. Off by default: it stores users' messages (never headers or keys)."""


class ExternalGuard(StrictModel):
    """An external guard model (Llama-Guard style) served OpenAI-compatibly, as the engine group ``role``; its
    categories S1..Sn are the guard's principles."""

    role: str = "guard"
    """The engine group that answers ``safe`` or ``unsafe`` + the violated categories."""
    safe_decides: bool = True
    """``safe`` allows without asking the judge; false: only ``unsafe`` decides, ``safe`` goes on to the judge."""
    max_tokens: int = Field(default=20, ge=1)
    timeout_s: float = Field(default=30.0, gt=0)
    """An external guard that has not answered within this long (or failed) passes the check to the judge."""


class GuardTrainConfig(StrictModel):
    """``cai train guard``: the classifier tier, fitted on what the data stages wrote into the run dir."""

    tokenizer: str = "embedded"
    """A Hugging Face folder, a .gguf file, or ``embedded`` (SmolLM2's tokenizer, read from its GGUF)."""
    base_model: str | None = None
    """A local Hugging Face folder of a (small) model to fine-tune as a sequence classifier; default: a tiny
    encoder trained from scratch (``hidden``, ``layers``) on ``tokenizer``'s vocabulary."""
    output_dir: str | None = None
    """Default: RUN_DIR/guard/classifier."""
    hidden: int = Field(default=128, ge=8)
    layers: int = Field(default=2, ge=1)
    heads: int = Field(default=4, ge=1)
    max_length: int = Field(default=512, ge=16)
    epochs: float = Field(default=4.0, gt=0)
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: run the epochs)."""
    batch_size: int = Field(default=16, ge=1)
    learning_rate: float = Field(default=1e-3, gt=0)
    held_out: float = Field(default=0.25, gt=0, lt=1)
    """Share of the examples (by a hash of their text) kept out of training for calibration."""
    target_fpr: float = Field(default=0.05, ge=0, lt=1)
    """``hi``: the lowest score at which at most this share of held-out fine examples would be blocked."""
    target_miss: float = Field(default=0.02, ge=0, lt=1)
    """``lo``: the highest score below which at most this share of held-out violations lies."""
    audit_dirs: list[str] = Field(default_factory=list)
    """Run dirs a guard served with ``classifier.keep_text``: their audited checks are learned too, the judge's
    call as the target (the run dir's own ``guard/audits`` always are)."""
    public: bool = True
    """Also train on bundled public prompts: hh-rlhf red-team first turns (violating) and self-instruct seed
    tasks (fine). XSTest and AdvBench are never trained on: they are what the guard is measured on."""
    generate: int = Field(default=0, ge=0)
    """Per principle, ask ``generate_role`` for this many violating requests and as many near-miss look-alikes
    that are fine (0: none)."""
    generate_role: str = JUDGE
    threads: int = Field(default=1, ge=1)
    """torch threads while training (a tiny model trains fastest on one, and a busy machine slows many)."""
    seed: int = 0


class GuardConfig(StrictModel):
    """The guard: which principles it checks, with which judge, and what it does per direction."""

    _key_hints: ClassVar[dict[str, str]] = dict.fromkeys(
        ("api_key", "apikey", "api_token", "key"),
        "use api_key_env (the name of the environment variable holding the key; keys never go in files)",
    )
    """What to say of an unknown key that looks like an inline API key."""


    principles: str = "harmless"
    """A comparison set or a constitution (built-in name or file): its principles are what is checked, and
    the rules they carry are the first tier."""
    constitution: str = "seed"
    """The constitution whose critique → revision the ``revise`` action runs."""
    judge_role: str = JUDGE
    """The engine group that judges (and critiques and revises, for ``revise``)."""
    ensemble: int | None = Field(default=None, ge=1)
    """Principles the judge is asked per check (by weight); default: all of them."""
    judge_timeout_s: float = Field(default=30.0, gt=0)
    classifier: ClassifierTier | None = None
    """The classifier tier between the rules and the judge (``cai train guard`` builds it)."""
    external: ExternalGuard | None = None
    """An external guard model between the classifier and the judge."""
    train: GuardTrainConfig = Field(default_factory=GuardTrainConfig)
    input: DirectionPolicy = Field(default_factory=DirectionPolicy)
    output: DirectionPolicy = Field(default_factory=DirectionPolicy)
    stream: StreamPolicy = Field(default_factory=StreamPolicy)
    size: SizePolicy = Field(default_factory=SizePolicy)
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
