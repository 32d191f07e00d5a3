"""The classifier tier checked against the judge on live traffic. With ``guard.classifier.audit`` a share of the
checks, picked by a hash of their text, goes to the judge whatever the classifier says; the verdict log keeps
the classifier's score and, in the tier's name, what it would have done (``audit-allow``/``audit-block``/
``audit-unsure``). :func:`audit_summary` says how often the two disagree on this traffic, with intervals, and
estimates the cascade's recall against the judge alone; :func:`recalibrate_classifier` resets the classifier's
``lo``/``hi`` from the audited scores, the judge's verdicts standing in for labels — the fix when live traffic is
unlike what the classifier was trained on (its held-out calibration no longer holds)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import polars as pl

from backends.errors import ConfigError
from cai_async.guard.classifier import CALIBRATION, calibrate
from cai_async.guard.verdicts import AUDITS, read_verdicts
from cai_async.judging import proportion
from cai_async.store import read_json, write_json

__all__ = ["AUDITS", "audit_summary", "audited", "recalibrate_classifier"]


def audited(verdicts: pl.DataFrame) -> pl.DataFrame:
    """The audited checks: ``direction``, ``classifier_score``, ``call`` (allow/block/unsure: the classifier's)
    and ``judge`` (whether the judge found a violation)."""
    schema = {"direction": pl.String(), "classifier_score": pl.Float64(), "call": pl.String(), "judge": pl.Boolean()}
    if verdicts.is_empty():
        return pl.DataFrame(schema=schema)
    return verdicts.filter(pl.col("tier").is_in(sorted(AUDITS)) & pl.col("classifier_score").is_not_null()).select(
        "direction", "classifier_score", call=pl.col("tier").str.strip_prefix("audit-"),
        judge=pl.col("violated").list.len() > 0)


def audit_summary(verdicts: pl.DataFrame) -> dict[str, Any] | None:
    """How the classifier's calls compare with the judge's on the audited checks (None: none audited):
    ``allowed_but_judge_flags`` (of the checks it would allow, the share the judge finds violating),
    ``blocked_but_judge_clears``, the judge's violation rate, and ``recall_vs_judge``: the share of what the
    judge would flag on this traffic that the cascade catches (its ``allow`` calls let the rest through),
    estimated from the audited sample; ``audit_share``: the share of the classifier's checks that were audited."""
    rows = audited(verdicts)
    if rows.is_empty():
        return None

    def count(call: str, judge: bool | None = None) -> int:
        part = rows.filter(pl.col("call") == call)
        return part.height if judge is None else part.filter(pl.col("judge") == judge).height

    allow_flagged, flagged = count("allow", True), int(rows["judge"].sum())
    summary: dict[str, Any] = {
        "audited": rows.height,
        "calls": {call: count(call) for call in ("allow", "block", "unsure")},
        "judge_violation_rate": proportion(flagged, rows.height),
        "allowed_but_judge_flags": proportion(allow_flagged, count("allow")),
        "blocked_but_judge_clears": proportion(count("block", False), count("block")),
    }
    # The audited checks are a uniform sample (by hash) of all the classifier scored: of what the judge flags
    # there, the cascade misses exactly what the classifier would have allowed.
    summary["recall_vs_judge"] = proportion(flagged - allow_flagged, flagged)
    summary["audit_share"] = rows.height / verdicts.filter(pl.col("classifier_score").is_not_null()).height
    return summary


def recalibrate_classifier(run_dir: str | Path, classifier: str | Path, *, target_fpr: float = 0.05,
                           target_miss: float = 0.02, min_each: int = 20) -> dict[str, Any]:
    """Reset ``lo``/``hi`` in ``classifier``'s ``calibration.json`` from the audited checks in ``run_dir``: the
    judge's verdicts are the labels (``hi``: at most ``target_fpr`` of what it clears is blocked; ``lo``: at most
    ``target_miss`` of what it flags is allowed). The trained thresholds are kept under ``trained``; returns the
    new calibration figures."""
    rows = audited(read_verdicts(run_dir))
    fine = rows.filter(~pl.col("judge"))["classifier_score"].to_list()
    violating = rows.filter(pl.col("judge"))["classifier_score"].to_list()
    if len(fine) < min_each or len(violating) < min_each:
        raise ConfigError(
            f"{run_dir}: {len(fine)} audited checks the judge found fine and {len(violating)} it found violating; "
            f"recalibrating needs at least {min_each} of each — serve longer, or raise guard.classifier.audit")
    path = Path(classifier) / CALIBRATION
    if not path.is_file():
        raise ConfigError(f"{classifier}: no trained guard classifier here ({CALIBRATION} missing)")
    try:
        current = read_json(path)
        before = {"lo": float(current["lo"]), "hi": float(current["hi"])}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: not a calibration `cai train guard` wrote ({type(exc).__name__}: {exc}); "
                          "retrain the classifier with `cai train guard`") from None
    figures = calibrate(fine, violating, target_fpr=target_fpr, target_miss=target_miss)
    trained = current.get("trained") or {k: current[k] for k in ("lo", "hi", "target_fpr", "target_miss",
                                                                 "held_out") if k in current}
    audit = {"run_dir": str(run_dir), "at": time.time(), **figures.pop("held_out")}
    updated = {**current, **figures, "trained": trained, "audit": audit}
    updated.pop("held_out", None)
    write_json(path, updated)  # never half-written: a crash leaves the old thresholds
    return {"path": str(classifier), "lo": figures["lo"], "hi": figures["hi"], "before": before, "audit": audit}
