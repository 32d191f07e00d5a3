"""Exit codes a script can trust, and the one computed from a run's summary."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

__all__ = [
    "FAILED_ROWS", "OK", "STOPPED", "USER_ERROR", "Outcome", "exit_code", "failed_items", "failure_count", "leaves",
    "outcome_code", "reports_code",
]

OK = 0
"""Every selected item finished ok."""
USER_ERROR = 2
"""A configuration, input or option is wrong (one line says what to fix); nothing ran."""
FAILED_ROWS = 3
"""The stages ran to the end, but some items failed (not written; a rerun retries them) or were recorded as
errors; the summary says how many and why. ``cai train guard``: the classifier trained, but its held-out scores do
not separate (one line says why), so it was not written."""
STOPPED = 4
"""The run stopped early: budget reached, every endpoint of a group down, a long rate-limit wait with
``retry.long_wait: stop``, a refused API key, or a trainer the run launched (OpenRLHF) that exited with an error.
Finished items are kept; a rerun resumes."""


def failure_count(stage: dict[str, Any]) -> int:
    """Items of a stage's ``summary.json`` entry (a summary read back) that did not finish ok: failed (not
    written), recorded errors (this run's, and earlier runs' kept without a retry), and the same for its nested
    parts (pairs, helpfulness responses) and evaluated models. A running recipe has each entry's report, which
    counts its own (``StageResult.failure_count``)."""
    count = sum(int(stage.get(key) or 0) for key in ("failed", "errors", "errors_kept"))
    for part in ("pairs", "helpful"):
        if isinstance(stage.get(part), dict):
            count += failure_count(stage[part])
    models = stage.get("models")
    if isinstance(models, dict):
        count += sum(int(entry.get("errors") or 0) for entry in models.values() if isinstance(entry, dict))
    return count


def outcome_code(*, stopped: bool, failed: int) -> int:
    """``STOPPED`` when the run or a stage stopped early, ``FAILED_ROWS`` when an item failed, else ``OK``."""
    if stopped:
        return STOPPED
    return FAILED_ROWS if failed else OK


class Outcome(Protocol):
    """What a run's entry reports (:class:`~cai_async.stages.unit.StageResult` is one)."""

    def failure_count(self) -> int:
        """Items that did not finish ok."""
        ...

    def stopped_early(self) -> object:
        """Whether (truthy: why) the entry stopped before its end."""
        ...


def failed_items(reports: Iterable[Outcome]) -> int:
    """Items of a run's entries that did not finish ok."""
    return sum(report.failure_count() for report in reports)


def reports_code(reports: Iterable[Outcome]) -> int:
    """The exit code of a run from its entries' reports (a run that stopped raised before): see
    :func:`outcome_code`."""
    kept = list(reports)
    return outcome_code(stopped=any(bool(r.stopped_early()) for r in kept), failed=failed_items(kept))


def exit_code(summary: dict[str, Any]) -> int:
    """The exit code of a run's summary (``summary.json`` read back): see :func:`outcome_code`."""
    stages = [s for s in summary.get("stages", {}).values() if isinstance(s, dict)]
    return outcome_code(stopped=bool(summary.get("stopped")) or any(s.get("stopped") for s in stages),
                        failed=sum(failure_count(s) for s in stages))


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (possibly nested) exception groups raised by task groups."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
    return [exc]
