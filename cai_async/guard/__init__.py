"""The inference-time guard: the constitution checks live traffic, as a library (:class:`Guard`) and as an
OpenAI-compatible proxy (``cai guard serve``); its classifier tier is trained by ``cai train guard``."""

from cai_async.guard.audit import audit_summary, recalibrate_classifier
from cai_async.guard.classifier import GuardClassifier
from cai_async.guard.config import (
    ClassifierTier,
    DirectionPolicy,
    ExternalGuard,
    GuardConfig,
    GuardTrainConfig,
    SizePolicy,
    StreamPolicy,
    UpstreamConfig,
)
from cai_async.guard.core import (
    VERDICT_SCHEMA,
    Guard,
    GuardPrinciple,
    PrincipleScore,
    TierReadings,
    Verdict,
    VerdictLog,
)
from cai_async.guard.exchange import ExchangeError, Part
from cai_async.guard.proxy import build_proxy_app, serve_guard
from cai_async.guard.report import guard_report

__all__ = [
    "VERDICT_SCHEMA",
    "ClassifierTier",
    "DirectionPolicy",
    "ExchangeError",
    "ExternalGuard",
    "Guard",
    "GuardClassifier",
    "GuardConfig",
    "GuardPrinciple",
    "GuardTrainConfig",
    "Part",
    "PrincipleScore",
    "SizePolicy",
    "StreamPolicy",
    "TierReadings",
    "UpstreamConfig",
    "Verdict",
    "VerdictLog",
    "audit_summary",
    "build_proxy_app",
    "guard_report",
    "recalibrate_classifier",
    "serve_guard",
]
