"""``cai loop RECIPE``: rounds of red-team → CAI data → retraining → measurement (:mod:`cai_async.loop`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import anyio
import typer

from cai_async.cli.console import console
from cai_async.cli.flags import SetOpt
from cai_async.exitcodes import FAILED_ROWS

__all__ = ["loop"]


def _rate(entry: Any) -> str:
    if not isinstance(entry, dict) or entry.get("value") is None:
        return "-"
    low, high = entry["ci95"]
    return f"{entry['value']:.0%} [{low:.0%},{high:.0%}]"


def loop(
    recipe: Annotated[Path, typer.Argument(help="Recipe with redteam, sl, train (and rl, eval, guard) sections and "
                                                "a loop section.")],
    rounds: Annotated[int | None, typer.Option(help="Rounds in all (a rerun with more goes on from the last "
                                                    "finished one).")] = None,
    sets: SetOpt = None,
) -> None:
    """Red-team the policy, turn what got through into the next round's SL-CAI prompts and preference pairs
    (with a replay share and benign near-misses), retrain, and measure again on a held-out attack set fixed at
    round 0 (and XSTest refusals, helpfulness vs the starting policy). Rounds go to RUN_DIR/round-K/, the record to
    loop.json and loop.html. A killed loop resumes at its step."""
    from cai_async.cli.progress import progress_display
    from cai_async.loop import load_loop_recipe, loop_columns, loop_rows, run_loop
    from cai_async.runlog import attach_run_log

    overrides = list(sets or []) + ([f"loop.rounds={rounds}"] if rounds is not None else [])
    recipe_obj, config = load_loop_recipe(recipe, overrides)
    attach_run_log(recipe_obj.run_dir)
    mode = recipe_obj.engine.progress
    try:
        state = anyio.run(lambda: run_loop(recipe_obj, config, say=lambda line: console.print(line, highlight=False),
                                           progress=lambda e, stage: progress_display(e, mode, label=stage)))
    except KeyboardInterrupt:
        console.print("interrupted: finished steps are kept; rerun the same command to resume at the step it was in")
        raise typer.Exit(130) from None
    rows = loop_rows(state)
    columns = loop_columns(rows)
    console.print(f"{'':<9} " + "".join(f"{short:<18} " for _, _, _, short in columns) + "cost", highlight=False)
    for row in rows:
        console.print(f"{row['label']:<9} " + "".join(f"{_rate(row.get(key)):<18} " for key, _, _, _ in columns)
                      + f"${float(row.get('cost_usd') or 0):.4f}", highlight=False)
    stopped = state.get("stopped") or {}
    console.print(f"stopped: {stopped.get('reason', '-')}", highlight=False)
    if state.get("report"):
        console.print(f"open {state['report']}", highlight=False)
    failed = sum(int(s.get("failed") or 0) for r in state["rounds"] for s in r["steps"].values())
    if failed:
        console.print(f"exit {FAILED_ROWS}: {failed} items failed or recorded errors (a rerun retries them)")
        raise typer.Exit(FAILED_ROWS)
