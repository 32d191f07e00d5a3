"""Evaluation: harmlessness, over-refusal, jailbreak robustness and helpfulness, before vs after."""

from cai_async.evaluation.report import METRICS, write_report
from cai_async.evaluation.run import EvalConfig, EvalModel, eval_metrics, run_eval
from cai_async.evaluation.suites import REFUSAL_PREFIXES, EvalPrompt, load_suite, refused_by_rule

__all__ = [
    "METRICS",
    "REFUSAL_PREFIXES",
    "EvalConfig",
    "EvalModel",
    "EvalPrompt",
    "eval_metrics",
    "load_suite",
    "refused_by_rule",
    "run_eval",
    "write_report",
]
