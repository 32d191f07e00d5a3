"""Typer commands. User errors print one clear line (no traceback) and exit 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from backends.errors import CaiError, RunStopped
from backends.registry import available_backends
from cai_async.exitcodes import STOPPED, USER_ERROR, exit_code, failure_count, leaves

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
console = Console(stderr=True, soft_wrap=True)

ProgressMode = Literal["auto", "rich", "plain", "off"]


@app.callback()
def _root(verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="Log engine events, and show other libraries' warnings and progress bars.")] = False,
) -> None:
    from cai_async.runlog import quiet_console

    quiet_console(verbose=verbose)


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


def _endpoint_overrides(
    recipe_data: dict[str, Any], flags: dict[str, Any]
) -> dict[str, Any]:
    """Endpoint flags replace the policy group with one endpoint (merged over its first endpoint)."""
    given = {k: v for k, v in flags.items() if v is not None}
    if not given:
        return recipe_data
    engine = recipe_data.setdefault("engine", {})
    groups = engine.setdefault("groups", {})
    first = dict((groups.get("policy") or [{}])[0])
    if "backend" in given and given["backend"] != first.get("backend"):
        first = {}
    first.update(given)
    groups["policy"] = [first]
    return recipe_data


def _load(recipe: Path | None, sets: list[str], extra: dict[str, Any], endpoint: dict[str, Any]) -> Any:
    from cai_async.configio import apply_overrides, validate
    from cai_async.recipes import Recipe, lift_method_keys, load_recipe

    base = load_recipe(recipe) if recipe is not None else Recipe()
    data = base.model_dump(mode="json")
    data = _endpoint_overrides(data, endpoint)
    if extra.pop(_BATCH, None):
        data = _use_batch(data)
    pairs = [f"{k}={json.dumps(v)}" for k, v in extra.items() if v is not None]
    data = lift_method_keys(apply_overrides(data, [*pairs, *sets]), source="--set", replace=True)
    return validate(Recipe, data, source=str(recipe) if recipe else "command line")


def _run(recipe_obj: Any) -> None:
    from cai_async.cli.progress import progress_display
    from cai_async.recipes import run_recipe
    from cai_async.runlog import attach_run_log

    attach_run_log(recipe_obj.run_dir)
    mode = recipe_obj.engine.progress
    try:
        summary = anyio.run(lambda: run_recipe(
            recipe_obj, progress=lambda e, stage: progress_display(e, mode, label=stage)))
    except KeyboardInterrupt:
        console.print("interrupted: finished results are kept; rerun the same command to resume")
        raise typer.Exit(130) from None
    run_dir = Path(summary["run_dir"])
    for name, stage in summary["stages"].items():
        _print_stage(name, stage)
    if "sl" in summary["stages"]:
        _print_chain(run_dir)
    elif "generate" in summary["stages"]:
        _print_example(run_dir / "generate")
    _print_summary_table(summary)
    _print_next(run_dir, summary)
    code = exit_code(summary)
    if code:
        failed = sum(failure_count(stage) for stage in summary["stages"].values())
        why = "stopped early" if code == STOPPED else f"{failed} items failed or recorded errors"
        console.print(f"exit {code}: {why} (see above; a rerun resumes, `--retry-errors` retries error rows)")
    raise typer.Exit(code)


def _stage_row(name: str, stage: dict[str, Any]) -> tuple[str, str, str, str, str, str]:
    """(stage, rows, failures, time, tokens, cost) of one stage's report, for the closing table."""
    usage = stage.get("usage") or {}
    tokens = f"{usage['tokens']:,}" if usage else "-"
    cost = f"${usage['cost_usd']:.4f}" if usage else "-"
    if name.startswith("train/"):
        return name, f"{stage['rows']:,}", "0", f"{stage['seconds']:.1f}s", tokens, cost
    if name == "eval":
        run = stage.get("run", {})
        failed = run.get("failed_not_recorded", 0) + run.get("pairwise_failed", 0) + failure_count(stage)
        return (name, f"{run.get('written', 0) + run.get('already_done', 0):,}", f"{failed}",
                f"{run.get('seconds', 0):.1f}s", tokens, cost)
    rows = stage.get("written", 0) + stage.get("skipped_already_done", 0)
    return name, f"{rows:,}", f"{failure_count(stage)}", f"{stage.get('seconds', 0):.1f}s", tokens, cost


def _print_summary_table(summary: dict[str, Any]) -> None:
    """One table for the whole run: each stage's rows, failures, time, tokens and cost."""
    from rich.table import Table

    table = Table(title="run summary", title_justify="left")
    for column in ("stage", "rows", "failures", "time", "tokens", "cost"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for name, stage in summary["stages"].items():
        table.add_row(*_stage_row(name, stage))
    console.print(table)
    for key in ("engine", "engine_eval"):
        engine = summary.get(key)
        if engine is not None:
            console.print(
                f"{'evaluation ' if key == 'engine_eval' else ''}calls: "
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
            console.print(f"  {name}: {export['path']} ({export['rows']} rows)")
        if "artefacts" in stage:
            console.print(f"  model: {stage['output_dir']}")
    report = summary["stages"].get("eval", {}).get("report")
    if report:
        console.print(f"  evaluation report: {report}")
    console.print(f"inspect: cai show {run_dir}; constitution card: cai constitution card NAME --run {run_dir}")


def _print_training(stage: dict[str, Any]) -> None:
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


def _print_stage(name: str, stage: dict[str, Any]) -> None:
    if name.startswith("train/"):
        _print_training(stage)
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
    if "helpful" in stage:
        _print_stage(f"{name}/helpful", stage["helpful"])
    if "pairs" in stage:
        pairs = stage["pairs"]
        console.print(f"[bold]{name}/pairs[/]: {pairs['pairs_written']} pairs from {pairs['prompts']} prompts "
                      f"({pairs['skipped_already_done']} already done), {pairs['identical_dropped']} identical "
                      f"responses dropped, {pairs['failed']} failed")
    if "labelled" in stage:
        console.print(f"[bold]{name}/labels[/]: {stage['labelled']} labelled, {stage['abstained']} abstained")


def _print_chain(run_dir: Path, count: int = 1) -> None:
    import polars as pl

    from cai_async.runinfo import chain_text
    from cai_async.store import read_shards

    frame = read_shards(run_dir / "sl")
    if frame.is_empty():
        return
    ok = frame.filter(pl.col("status") == "ok")
    for row in (ok if not ok.is_empty() else frame).head(count).iter_rows(named=True):
        console.print(Text(chain_text(row)))


def _print_example(directory: Path) -> None:
    from cai_async.store import read_shards

    frame = read_shards(directory)
    if frame.is_empty():
        return
    row = frame.row(0, named=True)
    console.print(f"[bold]example[/] prompt: {escape(row['prompt'][:200])}")
    console.print(f"[bold]example[/] response: {escape(row['response'][:400])}")


RecipeArg = Annotated[Path | None, typer.Argument(help="Recipe YAML/JSON/TOML.", show_default=False)]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a key: engine.max_concurrency=32")]


InputOpt = Annotated[str | None, typer.Option(help="Prompts: .jsonl/.json/.csv/.parquet or a saved HF dataset.")]
RunDirOpt = Annotated[str | None, typer.Option(help="Run directory.")]
LimitOpt = Annotated[int | None, typer.Option(help="Only the first N prompts.")]
BackendOpt = Annotated[str | None, typer.Option(help="Policy endpoint backend: openai | llamacpp.")]
ModelOpt = Annotated[str | None, typer.Option(help="Model name, or GGUF path for llamacpp.")]
BaseUrlOpt = Annotated[str | None, typer.Option(help="OpenAI-compatible base URL (…/v1).")]
KeyEnvOpt = Annotated[str | None, typer.Option(help="Name of the env var holding the API key.")]
RpmOpt = Annotated[float | None, typer.Option(help="Requests per minute limit.")]
TpmOpt = Annotated[float | None, typer.Option(help="Tokens per minute limit.")]
ConcurrencyOpt = Annotated[int | None, typer.Option(help="Global concurrency cap.")]
BudgetOpt = Annotated[float | None, typer.Option(
    "--max-cost", "--budget-usd", help="Dollars: stop scheduling new calls once spent + committed would pass it.")]
BatchOpt = Annotated[bool, typer.Option(
    "--batch", help="Send every OpenAI-compatible endpoint's calls through its Batch API (about half price).")]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="Disable the request cache.")]
RetryErrorsOpt = Annotated[bool, typer.Option(
    "--retry-errors", help="Rerun every row recorded with an error (default: only endpoint-side classes).")]
ProgressOpt = Annotated[str | None, typer.Option(help="auto | rich | plain | off")]
RayOpt = Annotated[str | None, typer.Option(
    "--ray", metavar="[ADDRESS]", help="Run the items on Ray engine actors (executor: ray): a new local cluster, "
    "or the one at ADDRESS (auto, HOST:PORT, ray://HOST:PORT).")]


def _ray_flags(ray: str | None) -> dict[str, Any]:
    """``--ray [ADDRESS]`` as recipe overrides."""
    if ray is None:
        return {}
    return {"executor": "ray", **({"ray.address": ray} if ray != "local" else {})}


def _ray_argv(argv: list[str]) -> list[str]:
    """``--ray`` takes a value only when the next word is a cluster address (``auto``, ``local``, ``HOST:PORT``,
    ``ray://…``); alone it means a new local cluster (typer has no options with an optional value)."""
    out = []
    for index, word in enumerate(argv):
        following = argv[index + 1] if index + 1 < len(argv) else ""
        address = following in ("auto", "local") or (":" in following and not following.startswith("-"))
        out.append("--ray=local" if word == "--ray" and not address else word)
    return out


def _engine_flags(max_concurrency: int | None, budget_usd: float | None, progress: str | None,
                  no_cache: bool, batch: bool = False) -> dict[str, Any]:
    return {
        "engine.max_concurrency": max_concurrency,
        "engine.budget_usd": budget_usd,
        "engine.progress": progress,
        "engine.cache.enabled": False if no_cache else None,
        _BATCH: True if batch else None,
    }


_BATCH = "endpoints.mode=batch"


def _use_batch(recipe_data: dict[str, Any]) -> dict[str, Any]:
    """``--batch``: every OpenAI-compatible endpoint of the recipe switches to the Batch API."""
    endpoints = [e for group in recipe_data.get("engine", {}).get("groups", {}).values() for e in group
                 if e.get("backend", "openai") == "openai"]
    if not endpoints:
        raise CaiError_("--batch needs an OpenAI-compatible endpoint (backend: openai); this recipe has none")
    for endpoint in endpoints:
        endpoint["mode"] = "batch"
    return recipe_data


def _endpoint_flags(backend: str | None, model: str | None, base_url: str | None, api_key_env: str | None,
                    rpm: float | None = None, tpm: float | None = None) -> dict[str, Any]:
    return {"backend": backend, "model": model, "base_url": base_url, "api_key_env": api_key_env,
            "rpm": rpm, "tpm": tpm}


def _only(recipe_obj: Any, stage: str) -> Any:
    """The recipe with every stage but ``stage`` switched off."""
    for name in ("generate", "sl", "rl", "train"):
        if name != stage:
            setattr(recipe_obj, name, None)
    section = getattr(recipe_obj, stage)
    if stage == "rl":
        if section is None or (section.pairs.source != "sl" and not section.pairs.input):
            raise CaiError_("no pairs: pass --input FILE (prompts, or a file with two response columns) or "
                            "--pairs-source sl --sl-run RUN_DIR")
    elif section is None or not section.input:
        raise CaiError_(f"no prompts: pass --input FILE or set {stage}.input in the recipe")
    return recipe_obj


@app.command()
def generate(
    recipe: RecipeArg = None,
    input: InputOpt = None,
    run_dir: RunDirOpt = None,
    limit: LimitOpt = None,
    backend: BackendOpt = None,
    model: ModelOpt = None,
    base_url: BaseUrlOpt = None,
    api_key_env: KeyEnvOpt = None,
    rpm: RpmOpt = None,
    tpm: TpmOpt = None,
    max_concurrency: ConcurrencyOpt = None,
    budget_usd: BudgetOpt = None,
    batch: BatchOpt = False,
    no_cache: NoCacheOpt = False,
    progress: ProgressOpt = None,
    sets: SetOpt = None,
) -> None:
    """Answer prompts with the policy group and write Parquet (defaults → RECIPE → flags)."""
    extra = {"run_dir": run_dir, "generate.input": input, "generate.limit": limit,
             **_engine_flags(max_concurrency, budget_usd, progress, no_cache, batch)}
    endpoint = _endpoint_flags(backend, model, base_url, api_key_env, rpm, tpm)
    _run(_only(_load(recipe, sets or [], extra, endpoint), "generate"))


@app.command()
def sl(
    recipe: RecipeArg = None,
    input: InputOpt = None,
    prompt_column: Annotated[str | None, typer.Option(help="Column with the prompt or conversation.")] = None,
    response_column: Annotated[str | None, typer.Option(help="Take initial responses from this column.")] = None,
    constitution: Annotated[str | None, typer.Option(help="Built-in name or constitution file.")] = None,
    num_revisions: Annotated[int | None, typer.Option(help="Critique → revision rounds per prompt.")] = None,
    retry_errors: RetryErrorsOpt = False,
    run_dir: RunDirOpt = None,
    limit: LimitOpt = None,
    backend: BackendOpt = None,
    model: ModelOpt = None,
    base_url: BaseUrlOpt = None,
    api_key_env: KeyEnvOpt = None,
    rpm: RpmOpt = None,
    tpm: TpmOpt = None,
    max_concurrency: ConcurrencyOpt = None,
    budget_usd: BudgetOpt = None,
    batch: BatchOpt = False,
    no_cache: NoCacheOpt = False,
    progress: ProgressOpt = None,
    ray: RayOpt = None,
    sets: SetOpt = None,
) -> None:
    """SL-CAI: initial response → critique → revision chains, then sft/pairs exports (defaults → RECIPE →
    flags)."""
    extra = {"run_dir": run_dir, "sl.input": input, "sl.limit": limit, "sl.prompt_column": prompt_column,
             "sl.response_column": response_column, "sl.constitution": constitution,
             "sl.num_revisions": num_revisions, "retry_errors": retry_errors or None,
             **_engine_flags(max_concurrency, budget_usd, progress, no_cache, batch), **_ray_flags(ray)}
    endpoint = _endpoint_flags(backend, model, base_url, api_key_env, rpm, tpm)
    _run(_only(_load(recipe, sets or [], extra, endpoint), "sl"))


@app.command()
def label(
    recipe: RecipeArg = None,
    pairs_source: Annotated[str | None, typer.Option(help="generate | sl | columns")] = None,
    input: InputOpt = None,
    sl_run: Annotated[str | None, typer.Option(help="pairs-source sl: the SL-CAI run directory.")] = None,
    principles: Annotated[str | None, typer.Option(help="Comparison set: built-in name or file.")] = None,
    ensemble: Annotated[int | None, typer.Option(help="Principles per pair.")] = None,
    swap: Annotated[bool | None, typer.Option("--swap/--no-swap", help="Score both orders.")] = None,
    cot: Annotated[bool | None, typer.Option("--cot/--no-cot", help="Chain-of-thought labels.")] = None,
    retry_errors: RetryErrorsOpt = False,
    run_dir: RunDirOpt = None,
    limit: LimitOpt = None,
    backend: BackendOpt = None,
    model: ModelOpt = None,
    base_url: BaseUrlOpt = None,
    api_key_env: KeyEnvOpt = None,
    rpm: RpmOpt = None,
    tpm: TpmOpt = None,
    max_concurrency: ConcurrencyOpt = None,
    budget_usd: BudgetOpt = None,
    batch: BatchOpt = False,
    no_cache: NoCacheOpt = False,
    progress: ProgressOpt = None,
    ray: RayOpt = None,
    sets: SetOpt = None,
) -> None:
    """RL-CAI: response pairs labelled by AI feedback, then dpo/reward exports (defaults → RECIPE → flags)."""
    extra = {"run_dir": run_dir, "rl.pairs.source": pairs_source, "rl.pairs.input": input,
             "rl.pairs.sl_run": sl_run, "rl.pairs.limit": limit, "rl.label.principles": principles,
             "rl.label.ensemble": ensemble, "rl.label.swap": swap, "rl.label.cot.enabled": cot,
             "retry_errors": retry_errors or None,
             **_engine_flags(max_concurrency, budget_usd, progress, no_cache, batch), **_ray_flags(ray)}
    endpoint = _endpoint_flags(backend, model, base_url, api_key_env, rpm, tpm)
    _run(_only(_load(recipe, sets or [], extra, endpoint), "rl"))


@app.command("label-quality")
def label_quality(
    recipe: RecipeArg = None,
    input: Annotated[str | None, typer.Option(help="hh-rlhf style JSONL(.gz) with chosen/rejected transcripts "
                                              "(default: the bundled hh-rlhf harmless-base test slice).")] = None,
    limit: Annotated[int, typer.Option(help="Pairs to label.")] = 200,
    out: Annotated[str | None, typer.Option(help="Output folder (default RUN_DIR/label_quality).")] = None,
    principles: Annotated[str | None, typer.Option(help="Comparison set: built-in name or file.")] = None,
    ensemble: Annotated[int | None, typer.Option(help="Principles per pair.")] = None,
    cot: Annotated[bool | None, typer.Option("--cot/--no-cot", help="Chain-of-thought labels.")] = None,
    run_dir: RunDirOpt = None,
    backend: BackendOpt = None,
    model: ModelOpt = None,
    base_url: BaseUrlOpt = None,
    api_key_env: KeyEnvOpt = None,
    max_concurrency: ConcurrencyOpt = None,
    progress: ProgressOpt = None,
    sets: SetOpt = None,
) -> None:
    """Label human-preference pairs and report accuracy, consistency, abstentions and calibration."""
    from cai_async.cli.progress import progress_display
    from cai_async.engine import Engine
    from cai_async.labelquality import run_label_quality
    from cai_async.public_data import BUNDLED, HH_PAIRS
    from cai_async.recipes import RLConfig

    extra = {"run_dir": run_dir, "rl.label.principles": principles, "rl.label.ensemble": ensemble,
             "rl.label.cot.enabled": cot, **_engine_flags(max_concurrency, None, progress, False)}
    endpoint = _endpoint_flags(backend, model, base_url, api_key_env)
    recipe_obj = _load(recipe, sets or [], extra, endpoint)
    label_config = (recipe_obj.rl or RLConfig()).label
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
    stage: Annotated[str, typer.Argument(help="sft | reward | dpo | rl")],
    recipe: RecipeArg = None,
    model: Annotated[str | None, typer.Option(help="HF folder, .gguf file, or 'embedded'.")] = None,
    run_dir: RunDirOpt = None,
    data: Annotated[str | None, typer.Option(help="Training data (default: RUN_DIR/exports/<stage>.parquet).")] = None,
    rl_algorithm: Annotated[str | None, typer.Option(help="dpo | soft_dpo | grpo | rloo | online_dpo")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after N optimizer steps.")] = None,
    lora: Annotated[bool | None, typer.Option("--lora/--full", help="LoRA adapter (default) or full finetune.")] = None,
    merge: Annotated[bool | None, typer.Option("--merge/--no-merge", help="Also save the merged model.")] = None,
    sets: SetOpt = None,
) -> None:
    """Train one stage with TRL on the data a run exported (defaults → RECIPE → flags)."""
    data_key = {"sft": "train.sft_data", "reward": "train.reward_data"}.get(stage, "train.dpo_data")
    extra = {"run_dir": run_dir, "train.model": model, data_key: data, "train.rl_algorithm": rl_algorithm,
             "train.max_steps": max_steps, "train.lora.enabled": lora, "train.merge": merge}
    recipe_obj = _load(recipe, sets or [], extra, {})
    from cai_async.runlog import attach_run_log
    from cai_async.train.config import TrainConfig
    from cai_async.train.run import run_training

    attach_run_log(recipe_obj.run_dir)
    config = recipe_obj.train or TrainConfig()
    config.check_stage(stage)
    _print_training(run_training(stage, config, recipe_obj.run_dir, engine_config=recipe_obj.engine))


@app.command("eval")
def evaluate(
    recipe: Annotated[Path, typer.Argument(help="Recipe with an eval section (models, suites) and the engine.")],
    n: Annotated[int | None, typer.Option(help="Prompts per suite.")] = None,
    compare: Annotated[tuple[str, str] | None, typer.Option(help="BEFORE AFTER: highlight the deltas.")] = None,
    run_dir: RunDirOpt = None,
    progress: ProgressOpt = None,
    budget_usd: BudgetOpt = None,
    batch: BatchOpt = False,
    ray: RayOpt = None,
    sets: SetOpt = None,
) -> None:
    """Evaluate models on harmlessness, over-refusal, jailbreaks and helpfulness; write an HTML report."""
    extra: dict[str, Any] = {"run_dir": run_dir, "eval.n": n, "engine.progress": progress,
                             "eval.compare": list(compare) if compare else None, "engine.budget_usd": budget_usd,
                             _BATCH: batch or None, **_ray_flags(ray)}
    recipe_obj = _load(recipe, sets or [], extra, {})
    if recipe_obj.eval is None:
        raise CaiError_(f"{recipe}: no eval section (models: [{{name, group}}], suites, n)")
    for name in ("generate", "sl", "rl", "train"):
        setattr(recipe_obj, name, None)
    from cai_async.cli.progress import progress_display
    from cai_async.recipes import run_recipe
    from cai_async.runlog import attach_run_log

    attach_run_log(recipe_obj.run_dir)
    summary = anyio.run(lambda: run_recipe(recipe_obj, progress=lambda e, stage: progress_display(
        e, recipe_obj.engine.progress, label=stage)))
    _print_eval(summary["stages"]["eval"])
    raise typer.Exit(exit_code(summary))


@app.command()
def show(
    run_dir: Annotated[Path, typer.Argument(help="Run directory.")],
    chains: Annotated[int, typer.Option(help="How many chains to print.")] = 3,
    errors: Annotated[bool, typer.Option("--errors", help="Print failed chains instead of finished ones.")] = False,
) -> None:
    """Counts, cost, failure reasons and a few chains of a run, readably."""
    import polars as pl

    from cai_async.runinfo import chain_text, describe_run
    from cai_async.store import read_shards

    info = describe_run(run_dir)
    typer.echo(yaml.safe_dump(info, sort_keys=False, allow_unicode=True, width=120).rstrip())
    frame = read_shards(run_dir / "sl")
    if chains and not frame.is_empty():
        picked = frame.filter((pl.col("status") != "ok") if errors else (pl.col("status") == "ok"))
        for row in picked.head(chains).iter_rows(named=True):
            typer.echo("")
            typer.echo(chain_text(row))


@app.command()
def run(recipe: Annotated[Path, typer.Argument(help="Recipe YAML/JSON/TOML.")], budget_usd: BudgetOpt = None,
        batch: BatchOpt = False, retry_errors: RetryErrorsOpt = False, ray: RayOpt = None,
        sets: SetOpt = None) -> None:
    """Run every stage a recipe lists, in order; the exit code covers them all (README: Exit codes)."""
    _run(_load(recipe, sets or [], {"engine.budget_usd": budget_usd, _BATCH: batch or None,
                                    "retry_errors": retry_errors or None, **_ray_flags(ray)}, {}))


@app.command()
def plan(recipe: Annotated[Path, typer.Argument(help="Recipe YAML/JSON/TOML.")], batch: BatchOpt = False,
         sets: SetOpt = None) -> None:
    """Estimate a recipe's calls, tokens, dollars and rate-limited time before spending anything."""
    from cai_async.plan import plan_recipe

    estimate = plan_recipe(_load(recipe, sets or [], {_BATCH: batch or None}, {}))
    for row in estimate["stages"]:
        limit = f", ≥ {row['min_minutes_by_rate_limits']} min at the rate limits" \
            if row["min_minutes_by_rate_limits"] else ""
        rounds = f", {row['batch_rounds']} batch rounds" if row["mode"] == "batch" else ""
        typer.echo(f"{row['stage']:<8} {row['group']:<10} {row['calls']:>7} calls  {row['input_tokens']:>10} in  "
                   f"{row['output_tokens']:>9} out  ${row['cost_usd']:.4f} ({row['mode']}){limit}{rounds}")
    total = estimate["total"]
    typer.echo(f"{'total':<19} {total['calls']:>7} calls  {total['input_tokens']:>10} in  "
               f"{total['output_tokens']:>9} out  ${total['cost_usd']:.4f}")
    typer.echo(f"priced online: ${total['cost_usd_online']:.4f}; through the Batch API: "
               f"${total['cost_usd_batch']:.4f} (--batch)")
    typer.echo(f"({estimate['method']})")


@app.command("config")
def show_config(recipe: RecipeArg = None, sets: SetOpt = None) -> None:
    """Print the resolved configuration (defaults → RECIPE → --set)."""
    typer.echo(yaml.safe_dump(_load(recipe, sets or [], {}, {}).model_dump(mode="json"), sort_keys=False))


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
        raise CaiError_(f"{run}: no such run directory")
    constitution = load_constitution(source)
    folder = out or (run / "card" if run is not None else Path(f"card-{constitution.name}"))
    paths = write_card(constitution, folder, run_dir=run)
    typer.echo(f"wrote {paths['markdown']} and {paths['html']}")


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

    data_recipe = _load(recipe, sets or [], extra, {})
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


@cache_app.command("stats")
def cache_stats(run_dir: Annotated[Path, typer.Argument(help="Run directory.")]) -> None:
    """Number of cached calls in a run."""
    from cai_async.engine import RequestCache

    path = run_dir / "cache.sqlite"
    if not path.exists():
        raise CaiError_(f"{path}: no cache here")
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
        raise CaiError_(f"{run_dir}: no config.yaml here; is it a run directory?")
    endpoints = [e for group in load_recipe(config).engine.groups.values() for e in group if e.mode == "batch"
                 and (run_dir / "batches" / e.name / "journal.sqlite").is_file()]
    if not endpoints:
        raise CaiError_(f"{run_dir}: no endpoint of this run sent batches")
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


class CaiError_(CaiError):
    """A user error found by the CLI itself."""


def main() -> None:
    """Entry point: run the app; user errors become one line on stderr and exit code 2, a run stopped early
    (endpoint group down, refused key) one line and exit code 4."""
    try:
        app(args=_ray_argv(sys.argv[1:]))
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
