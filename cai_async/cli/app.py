"""Typer commands. User errors print one clear line (no traceback) and exit 2. The stages' commands are built
from the stage registry (:mod:`cai_async.cli.stages`); the flags they share are declared once
(:mod:`cai_async.cli.flags`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import anyio
import typer
import yaml
from rich.text import Text

from backends.errors import CaiError, ConfigError, RunStopped
from backends.registry import available_backends
from cai_async.cli.console import console
from cai_async.cli.flags import (
    BatchOpt,
    BudgetOpt,
    RayOpt,
    RecipeArg,
    RetryErrorsOpt,
    RunDirOpt,
    SetOpt,
    flag_values,
    load_with_flags,
    ray_argv,
    shared,
    use_batch,
    with_flags,
)
from cai_async.cli.init_cmds import init
from cai_async.cli.loop_cmds import loop
from cai_async.cli.reward_cmds import reward_app
from cai_async.cli.stages import add_stage_commands
from cai_async.cli.summary import print_ppo, print_training, run_and_report
from cai_async.exitcodes import STOPPED, USER_ERROR, leaves

__all__ = ["app", "main"]

app = typer.Typer(
    name="cai",
    help="cai-async: Constitutional AI data generation and feedback over an anyio engine.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
cache_app = typer.Typer(help="Inspect or clear a run's request cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
constitution_app = typer.Typer(help="List, show and convert constitutions.", no_args_is_help=True)
batches_app = typer.Typer(help="A run's Batch API batches: list them, or cancel those in flight.", no_args_is_help=True)
app.add_typer(batches_app, name="batches")
app.add_typer(constitution_app, name="constitution")
guard_app = typer.Typer(help="The inference-time guard: an OpenAI-compatible proxy, and its report.",
                        no_args_is_help=True)
app.add_typer(guard_app, name="guard")
app.add_typer(reward_app, name="reward")


@app.callback()
def _root(verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="Log engine events, and show other libraries' warnings and progress bars.")] = False,
) -> None:
    from cai_async.runlog import quiet_console

    quiet_console(verbose=verbose)


app.command("init")(init)
app.command("loop")(loop)


@app.command()
def version() -> None:
    """Print the cai-async version."""
    from cai_async import __version__

    typer.echo(f"cai-async {__version__}")


@app.command()
def backends() -> None:
    """List the registered backends."""
    for name in available_backends():
        typer.echo(name)


add_stage_commands(app)  # cai generate, sl, label, eval, and any registered stage's command


_LABEL_QUALITY_FLAGS = shared("run_dir", "backend", "model", "base_url", "api_key_env", "max_concurrency", "progress")


@app.command("label-quality")
@with_flags(_LABEL_QUALITY_FLAGS)
def label_quality(
    recipe: RecipeArg = None,
    input: Annotated[str | None, typer.Option(help="hh-rlhf style JSONL(.gz) with chosen/rejected transcripts "
                                              "(default: the bundled hh-rlhf harmless-base test slice).")] = None,
    limit: Annotated[int, typer.Option(help="Pairs to label.")] = 200,
    out: Annotated[str | None, typer.Option(help="Output folder (default RUN_DIR/label_quality).")] = None,
    principles: Annotated[str | None, typer.Option(help="Comparison set: built-in name or file.")] = None,
    ensemble: Annotated[int | None, typer.Option(help="Principles per pair.")] = None,
    cot: Annotated[bool | None, typer.Option("--cot/--no-cot", help="Chain-of-thought labels.")] = None,
    sets: SetOpt = None,
    flags: dict[str, Any] | None = None,
) -> None:
    """Label human-preference pairs and report accuracy, consistency, abstentions and calibration."""
    from cai_async.cli.progress import progress_display
    from cai_async.engine import Engine
    from cai_async.labelquality import run_label_quality
    from cai_async.public_data import BUNDLED, HH_PAIRS
    from cai_async.stages.rl import RLConfig

    shared_extra, endpoint = flag_values(_LABEL_QUALITY_FLAGS, flags or {})
    extra = {"label.label.principles": principles, "label.label.ensemble": ensemble, "label.label.cot.enabled": cot,
             **shared_extra}
    recipe_obj = load_with_flags(recipe, sets or [], extra, endpoint)
    label_config = (recipe_obj.label or RLConfig()).label
    folder = Path(out) if out else Path(recipe_obj.run_dir) / "label_quality"
    from cai_async.runlog import attach_run_log

    attach_run_log(recipe_obj.run_dir)

    async def go() -> dict[str, Any]:
        async with Engine(recipe_obj.engine, run_dir=recipe_obj.run_dir) as engine:
            async with progress_display(engine, recipe_obj.engine.progress, label="label-quality"):
                return await run_label_quality(engine, label_config, input or BUNDLED / HH_PAIRS, folder, limit=limit)

    try:
        metrics = anyio.run(go)
    except KeyboardInterrupt:
        console.print("interrupted: finished labels are kept; rerun the same command to resume")
        raise typer.Exit(130) from None
    typer.echo((folder / "report.md").read_text(encoding="utf-8"))
    console.print(f"outputs: {', '.join(metrics['files'].values())}")


@app.command()
def train(
    stage: Annotated[str, typer.Argument(help="sft | reward | dpo | rl | guard (the guard's classifier)")],
    recipe: RecipeArg = None,
    model: Annotated[str | None, typer.Option(help="HF folder, .gguf file, or 'embedded'.")] = None,
    run_dir: RunDirOpt = None,
    data: Annotated[str | None, typer.Option(help="Training data (default: RUN_DIR/exports/<stage>.parquet).")] = None,
    rl_algorithm: Annotated[str | None, typer.Option(help="dpo | soft_dpo | grpo | rloo | online_dpo | ppo")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after N optimizer steps.")] = None,
    lora: Annotated[bool | None, typer.Option("--lora/--full", help="LoRA adapter (default) or full finetune.")] = None,
    merge: Annotated[bool | None, typer.Option("--merge/--no-merge", help="Also save the merged model.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="rl with rl_algorithm ppo: write and print the "
                                          "OpenRLHF command, don't run it.")] = False,
    sets: SetOpt = None,
) -> None:
    """Train one stage with TRL on the data a run exported (defaults → RECIPE → flags); rl with
    ``rl_algorithm: ppo`` runs OpenRLHF with ``cai reward serve``'s reward; guard fits the guard's classifier."""
    if stage == "guard":  # --model: a local HF folder to fine-tune (default: a tiny encoder from scratch)
        from cai_async.cli.guard_cmds import train_guard

        return train_guard(load_with_flags(recipe, sets or [], {
            "run_dir": run_dir, "guard.train.base_model": model, "guard.train.max_steps": max_steps}, {}))
    data_key = {"sft": "train.sft_data", "reward": "train.reward_data"}.get(stage, "train.dpo_data")
    extra = {"run_dir": run_dir, "train.model": model, data_key: data, "train.rl_algorithm": rl_algorithm,
             "train.max_steps": max_steps, "train.lora.enabled": lora, "train.merge": merge}
    recipe_obj = load_with_flags(recipe, sets or [], extra, {})
    from cai_async.runlog import attach_run_log
    from cai_async.train.config import TrainConfig
    from cai_async.train.run import run_training

    attach_run_log(recipe_obj.run_dir)
    config = recipe_obj.train or TrainConfig()
    config.check_stage(stage)
    if dry_run:
        from cai_async.train.ppo import run_ppo

        if stage != "rl" or config.rl_algorithm != "ppo":
            raise ConfigError("--dry-run is for `cai train rl` with rl_algorithm ppo (OpenRLHF)")
        return print_ppo(run_ppo(config, recipe_obj.run_dir, engine_config=recipe_obj.engine, dry_run=True))
    print_training(run_training(stage, config, recipe_obj.run_dir, engine_config=recipe_obj.engine))


@app.command()
def show(
    run_dir: Annotated[Path, typer.Argument(help="Run directory.")],
    chains: Annotated[int, typer.Option(help="How many chains to print.")] = 3,
    errors: Annotated[bool, typer.Option("--errors", help="Print failed chains instead of finished ones.")] = False,
) -> None:
    """Counts, cost, failure reasons and a few chains of a run, readably."""
    from cai_async.runinfo import chain_text, describe_run, sample_chains

    info = describe_run(run_dir)
    typer.echo(yaml.safe_dump(info, sort_keys=False, allow_unicode=True, width=120).rstrip())
    for row in sample_chains(run_dir, chains, errors=errors):
        typer.echo("")
        typer.echo(chain_text(row))


@app.command()
def run(recipe: Annotated[Path, typer.Argument(help="Recipe YAML/JSON/TOML.")], budget_usd: BudgetOpt = None,
        batch: BatchOpt = False, retry_errors: RetryErrorsOpt = False, ray: RayOpt = None,
        sets: SetOpt = None) -> None:
    """Run every stage a recipe lists, in order; the exit code covers them all (README: Exit codes)."""
    extra, _ = flag_values(shared("budget_usd", "batch", "ray"), {"budget_usd": budget_usd, "batch": batch, "ray": ray})
    run_and_report(load_with_flags(recipe, sets or [], {**extra, "retry_errors": retry_errors or None}, {}))


@app.command()
def plan(recipe: Annotated[Path, typer.Argument(help="Recipe YAML/JSON/TOML.")], batch: BatchOpt = False,
         sets: SetOpt = None) -> None:
    """Estimate a recipe's calls, tokens, dollars and rate-limited time before spending anything."""
    from cai_async.loop.config import is_loop_recipe
    from cai_async.plan import plan_recipe

    if is_loop_recipe(recipe):  # the baseline once and every round (cai loop)
        from cai_async.loop import load_loop_recipe
        from cai_async.loop.plan import plan_loop
        from cai_async.recipes import Recipe

        loop_recipe, loop = load_loop_recipe(recipe, sets or [])
        if batch:
            loop_recipe = Recipe.model_validate(use_batch(loop_recipe.model_dump(mode="json")))
        estimate = plan_loop(loop_recipe, loop)
    else:
        extra, _ = flag_values(shared("batch"), {"batch": batch})
        estimate = plan_recipe(load_with_flags(recipe, sets or [], extra, {}))
    wide = max([8, *(len(row["stage"]) for row in estimate["stages"])])
    for row in estimate["stages"]:
        limit = f", ≥ {row['min_minutes_by_rate_limits']} min at the rate limits" \
            if row["min_minutes_by_rate_limits"] else ""
        rounds = f", {row['batch_rounds']} batch rounds" if row["mode"] == "batch" else ""
        typer.echo(f"{row['stage']:<{wide}} {row['group']:<12} {row['calls']:>7} calls  {row['input_tokens']:>10} in  "
                   f"{row['output_tokens']:>9} out  ${row['cost_usd']:.4f} ({row['mode']}){limit}{rounds}")
    total = estimate["total"]
    if "rounds" in estimate:
        typer.echo(f"(start: the held-out baseline, once; round: each of {estimate['rounds']} round(s))")
    typer.echo(f"{'total':<{wide + 13}} {total['calls']:>7} calls  {total['input_tokens']:>10} in  "
               f"{total['output_tokens']:>9} out  ${total['cost_usd']:.4f}")
    typer.echo(f"priced online: ${total['cost_usd_online']:.4f}; through the Batch API: "
               f"${total['cost_usd_batch']:.4f} (--batch)")
    typer.echo(f"({estimate['method']})")


@app.command("config")
def show_config(recipe: RecipeArg = None, sets: SetOpt = None) -> None:
    """Print the resolved configuration (defaults → RECIPE → --set)."""
    typer.echo(yaml.safe_dump(load_with_flags(recipe, sets or [], {}, {}).model_dump(mode="json"), sort_keys=False))


@constitution_app.command("list")
def constitution_list() -> None:
    """Names of the built-in constitutions."""
    from cai_async.constitution_io import builtin_constitutions, load_constitution

    for name in builtin_constitutions():
        c = load_constitution(name)
        typer.echo(f"{name}: {len(c.principles)} principles, draw={c.draw} — {c.description}")


@constitution_app.command("show")
def constitution_show(
    source: Annotated[str, typer.Argument(help="Built-in name or file (YAML/JSON/TOML, public layouts too).")],
) -> None:
    """Print a constitution: its hash, draw mode and every principle."""
    from cai_async.constitution_io import load_constitution

    c = load_constitution(source)
    typer.echo(f"{c.name} v{c.version}  hash {c.content_hash}  draw={c.draw}  "
               f"{len(c.principles)} principles, {len(c.few_shot)} few-shot examples")
    if c.description:
        typer.echo(c.description)
    for p in c.principles:
        tags = f"  tags={','.join(p.tags)}" if p.tags else ""
        typer.echo(f"\n[{p.name}]  weight={p.weight:g}  priority={p.priority}{tags}")
        typer.echo(f"  critique: {p.critique}")
        typer.echo(f"  revision: {p.revision}")


@constitution_app.command("convert")
def constitution_convert(
    source: Annotated[str, typer.Argument(help="Built-in name or file in any supported layout.")],
    target: Annotated[Path, typer.Argument(help="Output file: .yaml, .json or .toml.")],
) -> None:
    """Save a constitution in cai-async's layout (e.g. import a public list- or dict-layout file)."""
    from cai_async.constitution_io import load_constitution, save_constitution

    c = load_constitution(source)
    typer.echo(f"wrote {save_constitution(c, target)} ({len(c.principles)} principles, hash {c.content_hash})")


@constitution_app.command("card")
def constitution_card(
    source: Annotated[str, typer.Argument(help="Built-in name or file in any supported layout.")],
    run: Annotated[Path | None, typer.Option(help="A run directory: add what each principle did there.")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: RUN/card, or ./card-NAME).")] = None,
) -> None:
    """Write the constitution card (Markdown + self-contained HTML): the page a team publishes and iterates
    from — principles, texts, examples, hash, and with --run per-principle statistics of that run."""
    from cai_async.card import write_card
    from cai_async.constitution_io import load_constitution

    if run is not None and not run.is_dir():
        raise ConfigError(f"{run}: no such run directory")
    constitution = load_constitution(source)
    folder = out or (run / "card" if run is not None else Path(f"card-{constitution.name}"))
    paths = write_card(constitution, folder, run_dir=run)
    typer.echo(f"wrote {paths['markdown']} and {paths['html']}")


@constitution_app.command("suggest")
def constitution_suggest(
    run_dir: Annotated[Path, typer.Argument(help="A run directory `cai redteam` wrote redteam/gaps.json into.")],
    out: Annotated[Path | None, typer.Option(help="The draft's file (default RUN_DIR/redteam/suggested_principle.yaml)."
                                             )] = None,
    role: Annotated[str, typer.Option(help="The engine group (of RUN_DIR/config.yaml) that drafts it.")] = "judge",
) -> None:
    """Draft ONE new principle (name, critique and revision requests) from a red-team run's uncovered failures —
    successful attacks no principle flags — and write it to a file for a person to review. It is never applied
    to a constitution."""
    from cai_async.constitution_io import load_comparison_set
    from cai_async.engine import Engine
    from cai_async.recipes import load_recipe
    from cai_async.redteam.suggest import SUGGESTION_FILE, suggest_principle, uncovered_failures, write_suggestion
    from cai_async.stages.unit import stage_unit

    gaps = run_dir / "redteam" / "gaps.json"
    failures = uncovered_failures(run_dir)
    if not failures:
        typer.echo(f"no uncovered failures in {gaps}: nothing to suggest")
        return
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise ConfigError(f"{run_dir}: no config.yaml here (the engine to ask); is it a run directory?")
    recipe = load_recipe(config)
    unit = stage_unit("redteam")
    section = unit.config(recipe) if unit is not None else None
    principles: list[tuple[str, str]] | None = None
    try:
        if section is not None:
            principles = [(p.name, p.question) for p in load_comparison_set(section.principles).principles]
    except CaiError:
        principles = None  # the draft is still asked for, without the current principles' texts

    async def go() -> Any:
        async with Engine(recipe.engine, run_dir=run_dir) as engine:
            return await suggest_principle(engine, role, failures, principles)

    principle = anyio.run(go)
    suggestion = write_suggestion(principle, out or run_dir / "redteam" / SUGGESTION_FILE, gaps=gaps,
                                  failures=failures)
    typer.echo(f"wrote {suggestion.path} (a draft from {len(failures)} uncovered failures, for review: no "
               "constitution was changed)")
    typer.echo(f"[{principle.name}]")
    typer.echo(f"  critique: {principle.critique}")
    typer.echo(f"  revision: {principle.revision}")


@guard_app.command("serve")
def guard_serve(
    recipe: RecipeArg = None,
    upstream: Annotated[str | None, typer.Option(help="Upstream OpenAI-compatible base URL (…/v1).")] = None,
    upstream_key_env: Annotated[str | None, typer.Option(help="Env var with the upstream's API key.")] = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on (0: any free one).")] = None,
    run_dir: RunDirOpt = None,
    sets: SetOpt = None,
) -> None:
    """Serve the guard in front of an upstream: /v1/chat/completions (plain and streamed), /v1/models,
    /v1/moderations; verdicts go to RUN_DIR/guard/verdicts (defaults → RECIPE → flags)."""
    from cai_async.guard.proxy import serve_guard
    from cai_async.runlog import attach_run_log

    extra = {"run_dir": run_dir, "guard.upstream.base_url": upstream, "guard.upstream.api_key_env": upstream_key_env,
             "guard.host": host, "guard.port": port}
    from cai_async.guard.config import GuardConfig

    data_recipe = load_with_flags(recipe, sets or [], extra, {})
    config = data_recipe.guard or GuardConfig()
    attach_run_log(data_recipe.run_dir)

    def ready(bound: int) -> None:
        console.print(f"cai guard: listening on http://{config.host}:{bound}/v1 → {config.upstream.base_url}")

    anyio.run(lambda: serve_guard(config, data_recipe.engine, data_recipe.run_dir, on_ready=ready))
    console.print(f"cai guard: stopped; verdicts are in {Path(data_recipe.run_dir) / 'guard' / 'verdicts'}")


@guard_app.command("report")
def guard_report_command(run_dir: Annotated[Path, typer.Argument(help="Run directory the guard served.")]) -> None:
    """What the guard decided: verdicts by direction, decision and tier, latency, violations per principle."""
    from cai_async.guard.report import guard_report

    typer.echo(json.dumps(guard_report(run_dir), indent=2, default=str))


@guard_app.command("calibrate")
def guard_calibrate_command(
    run_dir: Annotated[Path, typer.Argument(help="Run directory the guard served with guard.classifier.audit > 0.")],
    classifier: Annotated[Path, typer.Argument(help="The classifier folder (cai train guard's) to recalibrate.")],
    target_fpr: Annotated[float, typer.Option(help="hi: at most this share of what the judge clears is blocked.")]
    = 0.05,
    target_miss: Annotated[float, typer.Option(help="lo: at most this share of what the judge flags is allowed.")]
    = 0.02,
    min_each: Annotated[int, typer.Option(help="Audited checks needed on each side of the judge's verdict.")] = 20,
) -> None:
    """Reset the classifier's lo/hi from the checks the judge audited: its verdicts stand in for labels (the
    trained thresholds are kept in calibration.json under "trained")."""
    from cai_async.cli.guard_cmds import calibrate_guard

    calibrate_guard(run_dir, classifier, target_fpr=target_fpr, target_miss=target_miss, min_each=min_each)


@cache_app.command("stats")
def cache_stats(run_dir: Annotated[Path, typer.Argument(help="Run directory.")]) -> None:
    """Number of cached calls in a run."""
    from cai_async.engine import RequestCache

    path = run_dir / "cache.sqlite"
    if not path.exists():
        raise ConfigError(f"{path}: no cache here")
    cache = RequestCache(path)
    typer.echo(f"{path}: {len(cache)} cached calls")
    cache.close()


@cache_app.command("clear")
def cache_clear(run_dir: Annotated[Path, typer.Argument(help="Run directory.")]) -> None:
    """Delete every cached call of a run (the next run pays for them again)."""
    from cai_async.engine import RequestCache

    cache = RequestCache(run_dir / "cache.sqlite")
    typer.echo(f"cleared {cache.clear()} cached calls")
    cache.close()


def _batch_endpoints(run_dir: Path) -> list[Any]:
    from cai_async.recipes import load_recipe

    config = run_dir / "config.yaml"
    if not config.is_file():
        raise ConfigError(f"{run_dir}: no config.yaml here; is it a run directory?")
    endpoints = [e for group in load_recipe(config).engine.groups.values() for e in group if e.mode == "batch"
                 and (run_dir / "batches" / e.name / "journal.sqlite").is_file()]
    if not endpoints:
        raise ConfigError(f"{run_dir}: no endpoint of this run sent batches")
    return endpoints


@batches_app.command("list")
def batches_list(run_dir: Annotated[Path, typer.Argument(help="Run directory.")]) -> None:
    """Every batch of a run: its state here, its id and status at the provider, its size."""
    from backends.batch_journal import BatchJournal

    for endpoint in _batch_endpoints(run_dir):
        journal = BatchJournal(run_dir / "batches" / endpoint.name)
        for entry in journal.entries():
            typer.echo(f"{endpoint.name}  {entry.local_id}  {entry.state:<10} {entry.batch_id or '-':<24} "
                       f"{entry.status or '-':<12} {entry.requests} requests")
        journal.close()


@batches_app.command("cancel")
def batches_cancel(run_dir: Annotated[Path, typer.Argument(help="Run directory.")]) -> None:
    """Cancel a run's batches still in flight at the provider (for a run you will not resume), keep what they
    finished; a later run submits the cancelled requests again. Needs the run's API key variable set."""
    from backends.openai_batch import OpenAIBatchBackend

    for endpoint in _batch_endpoints(run_dir):
        backend = OpenAIBatchBackend(endpoint.settings(state_dir=str(run_dir / "batches" / endpoint.name)))
        outcome = anyio.run(backend.cancel_unfinished)
        for batch in outcome:
            typer.echo(f"{endpoint.name}  {batch['batch']}  {batch.get('id') or '-'}  {batch['status']}  "
                       f"{batch['requests']} requests")
        if not outcome:
            typer.echo(f"{endpoint.name}: no batch in flight")


def main() -> None:
    """Entry point: run the app; user errors become one line on stderr and exit code 2, a run stopped early
    (endpoint group down, refused key) one line and exit code 4."""
    add_stage_commands(app)  # stages registered since this module was imported
    try:
        app(args=ray_argv(sys.argv[1:]))
    except (CaiError, KeyboardInterrupt, BaseExceptionGroup) as exc:
        found = leaves(exc)
        if any(isinstance(leaf, KeyboardInterrupt) for leaf in found):
            console.print("interrupted: finished results are kept; rerun the same command to resume")
            sys.exit(130)
        if not all(isinstance(leaf, CaiError) for leaf in found):
            raise
        stopped = [leaf for leaf in found if isinstance(leaf, RunStopped)]
        label = "stopped: " if stopped else "error: "
        for leaf in dict.fromkeys(str(leaf) for leaf in stopped or found):
            console.print(Text.assemble((label, "bold red"), leaf), highlight=False)
        sys.exit(STOPPED if stopped else USER_ERROR)
