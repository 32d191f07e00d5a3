"""``cai train guard``: the guard's classifier tier, trained on a run's data (the rest of ``cai guard`` lives
in :mod:`cai_async.cli.app`)."""

from __future__ import annotations

import json
from typing import Any

import typer

from cai_async.cli.summary import console

__all__ = ["train_guard"]


def train_guard(recipe_obj: Any) -> None:
    """Train the guard classifier from ``recipe_obj``'s run dir and guard section; print where it went, what it
    learned from and its calibration (the JSON summary on stdout)."""
    from cai_async.guard.config import GuardConfig
    from cai_async.guard.fit import fit_guard_classifier
    from cai_async.runlog import attach_run_log

    attach_run_log(recipe_obj.run_dir)
    config = recipe_obj.guard or GuardConfig()
    summary = fit_guard_classifier(recipe_obj.run_dir, config, recipe_obj.engine)
    held, training = summary["held_out"], summary["training"]
    console.print(
        f"[bold]guard classifier[/] ({summary['model']}, {summary['parameters']:,} parameters): "
        f"{training['steps']} steps on {training['examples']} examples in {training['seconds']:.1f}s, loss "
        f"{training['first_loss']:.3f} → {training['last_loss']:.3f}")
    console.print(
        f"  held out ({held['fine']} fine, {held['violating']} violating): AUC {held['auc']:.3f}; blocks at ≥ "
        f"{summary['hi']:.3f} (FPR {held['fpr_at_hi']:.1%}, recall {held['recall_at_hi']:.1%}), allows below "
        f"{summary['lo']:.3f} (misses {held['miss_below_lo']:.1%}); {held['share_between']:.1%} go on to the judge")
    console.print(f"  {summary['path']}/ — use it with guard.classifier.path: {summary['path']}")
    typer.echo(json.dumps(summary, indent=2))
