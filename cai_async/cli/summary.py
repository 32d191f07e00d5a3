"""What the CLI prints of a run: each stage's lines, a chain or an example, the summary table, the files to open
next; and running a recipe with a progress display, ending in the run's exit code."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import typer
from rich.markup import escape
from rich.text import Text

from cai_async.cli.console import console
from cai_async.exitcodes import STOPPED, failed_items, reports_code

if TYPE_CHECKING:
    from cai_async.stages.unit import StageResult

__all__ = ["print_ppo", "print_stage", "print_training", "run_and_report"]


def run_and_report(recipe_obj: Any, *, only: str | None = None) -> None:
    """Run the recipe with a progress display and print what it did; exit with the run's exit code. ``only``: print
    that stage's lines and nothing else (``cai eval``)."""
    from cai_async.cli.progress import progress_display
    from cai_async.recipes import run_recipe
    from cai_async.runlog import attach_run_log

    attach_run_log(recipe_obj.run_dir)
    mode = recipe_obj.engine.progress
    reports: dict[str, StageResult] = {}
    try:
        summary = anyio.run(lambda: run_recipe(
            recipe_obj, progress=lambda e, stage: progress_display(e, mode, label=stage), reports=reports))
    except KeyboardInterrupt:
        console.print("interrupted: finished results are kept; rerun the same command to resume")
        raise typer.Exit(130) from None
    if only is not None:
        for name, stage in summary["stages"].items():
            if name == only or name.startswith(f"{only}/"):
                print_stage(name, stage)
        raise typer.Exit(reports_code(reports.values()))
    run_dir = Path(summary["run_dir"])
    for name, stage in summary["stages"].items():
        print_stage(name, stage)
    if "sl" in summary["stages"]:
        _print_chain(run_dir)
    elif "generate" in summary["stages"]:
        _print_example(run_dir / "generate")
    _print_summary_table(summary, reports)
    _print_next(run_dir, summary)
    code = reports_code(reports.values())
    if code:
        failed = failed_items(reports.values())
        why = "stopped early" if code == STOPPED else f"{failed} items failed or recorded errors"
        console.print(f"exit {code}: {why} (see above; a rerun resumes, `--retry-errors` retries error rows)")
    raise typer.Exit(code)


def _gate_cell(stage: dict[str, Any]) -> str:
    """The quality gates' cell of a stage that revises: revisions rejected / checked."""
    gates = stage.get("gates")
    if not isinstance(gates, dict) or not gates.get("revision_steps"):
        return "-"
    return f"{gates['rejected']}/{gates['revision_steps']}"


def _stage_row(name: str, stage: dict[str, Any], failures: int) -> tuple[str, str, str, str, str, str, str]:
    """(stage, rows, failures, time, tokens, cost, gate rejects) of one stage's ``summary.json`` entry and its
    report's failure count, for the closing table."""
    usage = stage.get("usage") or {}
    tokens = f"{usage['tokens']:,}" if usage else "-"
    cost = f"${usage['cost_usd']:.4f}" if usage else "-"
    if name.startswith("train/"):
        return name, f"{stage['rows']:,}", "0", f"{stage['seconds']:.1f}s", tokens, cost, "-"
    if name == "eval":
        run = stage.get("run", {})
        failed = run.get("failed_not_recorded", 0) + run.get("pairwise_failed", 0) + failures
        return (name, f"{run.get('written', 0) + run.get('already_done', 0):,}", f"{failed}",
                f"{run.get('seconds', 0):.1f}s", tokens, cost, "-")
    rows = stage.get("written", 0) + stage.get("skipped_already_done", 0)
    return (name, f"{rows:,}", f"{failures}", f"{stage.get('seconds', 0):.1f}s", tokens, cost,
            _gate_cell(stage))


def _print_summary_table(summary: dict[str, Any], reports: Mapping[str, StageResult]) -> None:
    """One table for the whole run: each stage's rows, failures, time, tokens and cost, and the revisions the
    quality gates rejected of those they checked (SL-CAI)."""
    from rich.table import Table

    table = Table(title="run summary", title_justify="left")
    for column in ("stage", "rows", "failures", "time", "tokens", "cost", "gated"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for name, stage in summary["stages"].items():
        table.add_row(*_stage_row(name, stage, reports[name].failure_count()))
    several = any(((summary.get(key) or {}).get("run_total") or {}).get("processes", 0) > 1
                  for key in ("engine", "engine_eval"))
    if several:  # a resumed run, or Ray actors: their calls are in the run total, not in this process's figures
        table.caption = "tokens and cost: the calls this process made; the run total below counts every process"
    console.print(table)
    for key in ("engine", "engine_eval"):
        engine = summary.get(key)
        if engine is not None:
            console.print(
                f"{'evaluation ' if key == 'engine_eval' else ''}calls{' in this process' if several else ''}: "
                f"{sum(e['calls'] for e in engine['endpoints'].values())}, cache hits: {engine['cache_hits']}, "
                f"tokens: {engine['tokens']}, cost: ${engine['cost_usd']:.4f}"
            )
            total = engine.get("run_total") or {}
            if total.get("processes", 0) > 1:
                console.print(f"run total over {total['processes']} processes: {total['calls']} calls, "
                              f"tokens: {total['tokens']}, cost: ${total['cost_usd']:.4f}")


def _print_next(run_dir: Path, summary: dict[str, Any]) -> None:
    """The files a user opens next: exports, the evaluation report, the log; and how to inspect the run."""
    console.print(f"outputs: {run_dir}/ (summary.json, config.yaml, cache.sqlite, run.log)")
    for stage in summary["stages"].values():
        for name, export in stage.get("exports", {}).items():
            console.print(f"  {name}: {export['path']} ({export['rows']} row{'' if export['rows'] == 1 else 's'})")
        if "artefacts" in stage:
            console.print(f"  model: {stage['output_dir']}")
    report = summary["stages"].get("eval", {}).get("report")
    if report:
        console.print(f"  evaluation report: {report}")
    console.print(f"inspect: cai show {run_dir}; constitution card: cai constitution card NAME --run {run_dir}")


def print_training(stage: dict[str, Any]) -> None:
    """One training stage's line: steps, rows, losses, and its output folder (PPO: OpenRLHF's outcome)."""
    if stage["algorithm"] == "ppo":
        return print_ppo(stage)
    console.print(
        f"[bold]train/{stage['stage']}[/] ({stage['algorithm']}, {stage['device']}, {stage['precision']}): "
        f"{stage['steps']} steps on {stage['rows']} rows in {stage['seconds']:.1f}s, loss "
        f"{stage['first_loss']} → {stage['last_loss']}; {stage['rows_over_max_length']} rows over "
        f"max_length={stage['max_length']}"
    )
    console.print(f"  {stage['output_dir']}/ ({', '.join(stage['artefacts'])})")


def _print_eval(metrics: dict[str, Any]) -> None:
    for model, entry in metrics["models"].items():
        parts = [f"{key} {value['value']:.1%}" for key, value in entry.items()
                 if isinstance(value, dict) and value.get("value") is not None]
        console.print(f"[bold]eval {escape(model)}[/]: {', '.join(parts)}; errors {entry['errors']}")
    for key, delta in (metrics.get("compare") or {}).items():
        if delta is not None:
            console.print(f"  Δ {key}: {delta:+.1%}")
    console.print(f"  report: {metrics['report']}")


def print_stage(name: str, stage: dict[str, Any]) -> None:
    """A stage's lines: written, already done, failed (with a few reasons), stopped; the parts it ran."""
    if name.startswith("train/"):
        print_training(stage)
        return
    if name == "eval":
        _print_eval(stage)
        return
    recorded = f", {stage['errors']} recorded errors" if "errors" in stage else ""
    if stage.get("errors_kept"):
        recorded += f" ({stage['errors_kept']} more kept from earlier runs; --retry-errors retries them)"
    console.print(
        f"[bold]{name}[/]: {stage['written']} written, {stage['skipped_already_done']} already done{recorded}, "
        f"{stage['failed']} failed (retried on rerun) in {stage['seconds']:.1f}s"
    )
    if stage["stopped"]:
        console.print(f"[yellow]stopped:[/] {escape(stage['stopped'])}")
    for failure in stage["failures"][:5]:
        console.print(f"[red]failed[/] {failure['id']}: {escape(failure['error'])}")
    if stage.get("failure_classes"):
        console.print("  by class: " + ", ".join(f"{k} {v}" for k, v in stage["failure_classes"].items()))
    if isinstance(stage.get("gates"), dict) and stage["gates"].get("revision_steps"):
        print_gates(name, stage)
    if name == "redteam" and isinstance(stage.get("gaps"), dict) and Path(stage["gaps"]["path"]).is_file():
        from cai_async.redteam.gaps import gap_lines
        from cai_async.store import read_json

        for line in gap_lines(read_json(stage["gaps"]["path"])):
            console.print(escape(line), highlight=False)
    if "helpful" in stage:
        print_stage(f"{name}/helpful", stage["helpful"])
    if "pairs" in stage:
        pairs = stage["pairs"]
        console.print(f"[bold]{name}/pairs[/]: {pairs['pairs_written']} pairs from {pairs['prompts']} prompts "
                      f"({pairs['skipped_already_done']} already done), {pairs['identical_dropped']} identical "
                      f"responses dropped, {pairs['failed']} failed")
    if "labelled" in stage:
        console.print(f"[bold]{name}/labels[/]: {stage['labelled']} labelled, {stage['abstained']} abstained")


def gates_line(gates: dict[str, Any], exports: dict[str, Any] | None = None) -> str:
    """The quality gates' counts as one line (plain text)."""
    by_gate = ", ".join(f"{g} {n}" for g, n in gates["by_gate"].items())
    line = (f"{gates['revision_steps']} revisions checked, {gates['first_failed']} "
            f"({gates['first_failed_rate'] or 0:.0%}) failed a gate at first{f' ({by_gate})' if by_gate else ''}, "
            f"{gates['retry_passed']} of {gates['retried']} retries passed, {gates['rejected']} rejected (previous "
            f"response kept); {gates['chains_without_passing']} of {gates['chains']} chains kept no revision")
    sft = (exports or {}).get("sft") or {}
    if "kept_failed_gates" in sft:
        return line + ": exported anyway (export.keep_failed_gates)"
    if gates["chains_without_passing"]:
        return line + ": left out of the exports (export.keep_failed_gates: true keeps them)"
    return line


def print_gates(name: str, stage: dict[str, Any]) -> None:
    """A revising stage's quality-gate line."""
    console.print(f"[bold]{name}/gates[/]: {escape(gates_line(stage['gates'], stage.get('exports')))}")


def _print_chain(run_dir: Path, count: int = 1) -> None:
    from cai_async.runinfo import chain_text, sample_chains

    for row in sample_chains(run_dir, count) or sample_chains(run_dir, count, errors=True):
        console.print(Text(chain_text(row)))


def _print_example(directory: Path) -> None:
    from cai_async.store import read_shards

    frame = read_shards(directory)
    if frame.is_empty():
        return
    row = frame.row(0, named=True)
    console.print(f"[bold]example[/] prompt: {escape(row['prompt'][:200])}")
    console.print(f"[bold]example[/] response: {escape(row['response'][:400])}")


def print_ppo(summary: dict[str, Any]) -> None:
    """What ``cai train rl`` did with ``rl_algorithm: ppo``: the command (stdout with ``--dry-run``), where it
    wrote the launch files, and how OpenRLHF exited."""
    if summary["dry_run"]:
        typer.echo(summary["command"])
        console.print(f"train/rl (ppo through OpenRLHF): not run (--dry-run); reward URL {summary['reward_url']}; "
                      f"launch script {summary['launch']}")
        return
    console.print(f"[bold]train/rl[/] (ppo through OpenRLHF): exit {summary['returncode']} after "
                  f"{summary['seconds']:.1f}s; output in {summary['output_dir']}/")
