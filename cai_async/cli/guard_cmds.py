"""``cai train guard``: the guard's classifier tier, trained on a run's data, and ``cai guard calibrate``: its
thresholds reset from the judge's audits (the rest of ``cai guard`` lives in :mod:`cai_async.cli.app`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.text import Text

from cai_async.cli.console import console
from cai_async.exitcodes import FAILED_ROWS

__all__ = ["calibrate_guard", "train_guard"]


def train_guard(recipe_obj: Any) -> None:
    """Train the guard classifier from ``recipe_obj``'s run dir and guard section; print where it went, what it
    learned from and its calibration (the JSON summary on stdout). A classifier whose held-out scores do not
    separate is not written: one line says why, and the exit code is 3."""
    from cai_async.guard.classifier import ClassifierRefused
    from cai_async.guard.config import GuardConfig
    from cai_async.guard.fit import fit_guard_classifier
    from cai_async.runlog import attach_run_log

    attach_run_log(recipe_obj.run_dir)
    config = recipe_obj.guard or GuardConfig()
    try:
        summary = fit_guard_classifier(recipe_obj.run_dir, config, recipe_obj.engine)
    except ClassifierRefused as exc:
        console.print(Text.assemble(("error: ", "bold red"), str(exc)), highlight=False)
        raise typer.Exit(FAILED_ROWS) from None
    held, training = summary["held_out"], summary["training"]
    console.print(
        f"[bold]guard classifier[/] ({summary['model']}, {summary['parameters']:,} parameters): "
        f"{training['steps']} steps on {training['examples']} examples in {training['seconds']:.1f}s, loss "
        f"{training['first_loss']:.3f} → {training['last_loss']:.3f}")
    console.print(
        f"  held out ({held['fine']} fine, {held['violating']} violating): AUC {held['auc']:.3f}, scores spread "
        f"over {held['spread']:.3f}; blocks at ≥ "
        f"{summary['hi']:.3f} (FPR {held['fpr_at_hi']:.1%}, recall {held['recall_at_hi']:.1%}), allows below "
        f"{summary['lo']:.3f} (misses {held['miss_below_lo']:.1%}); {held['share_between']:.1%} go on to the judge")
    console.print(f"  {summary['path']}/ — use it with guard.classifier.path: {summary['path']}")
    typer.echo(json.dumps(summary, indent=2))


def calibrate_guard(run_dir: Path, classifier: Path, *, target_fpr: float, target_miss: float,
                    min_each: int) -> None:
    """Recalibrate ``classifier`` from ``run_dir``'s audited checks; print what changed (JSON on stdout)."""
    from cai_async.guard.audit import recalibrate_classifier

    summary = recalibrate_classifier(run_dir, classifier, target_fpr=target_fpr, target_miss=target_miss,
                                     min_each=min_each)
    audit, before = summary["audit"], summary["before"]
    console.print(
        f"[bold]guard classifier[/] recalibrated on {audit['fine'] + audit['violating']} audited checks "
        f"({audit['fine']} the judge cleared, {audit['violating']} it flagged; AUC against the judge "
        f"{audit['auc']:.3f}): blocks at ≥ {summary['hi']:.3f} (was {before['hi']:.3f}; FPR vs the judge "
        f"{audit['fpr_at_hi']:.1%}), allows below {summary['lo']:.3f} (was {before['lo']:.3f}; misses vs the judge "
        f"{audit['miss_below_lo']:.1%}); {audit['share_between']:.1%} go on to the judge")
    typer.echo(json.dumps(summary, indent=2))
