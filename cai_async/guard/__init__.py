"""The inference-time guard: the constitution checks live traffic, as a library (:class:`Guard`) and as an
OpenAI-compatible proxy (``cai guard serve``)."""

from cai_async.guard.config import DirectionPolicy, GuardConfig, StreamPolicy, UpstreamConfig
from cai_async.guard.core import VERDICT_SCHEMA, Guard, GuardPrinciple, PrincipleScore, Verdict, VerdictLog
from cai_async.guard.proxy import build_proxy_app, serve_guard
from cai_async.guard.report import guard_report

__all__ = [
    "VERDICT_SCHEMA",
    "DirectionPolicy",
    "Guard",
    "GuardConfig",
    "GuardPrinciple",
    "PrincipleScore",
    "StreamPolicy",
    "UpstreamConfig",
    "Verdict",
    "VerdictLog",
    "build_proxy_app",
    "guard_report",
    "serve_guard",
]
