"""Typer commands. User errors print one clear line (no traceback) and exit 2."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from backends.errors import CaiError
from backends.registry import available_backends

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
console = Console(stderr=True, soft_wrap=True)

ProgressMode = Literal["auto", "rich", "plain", "off"]


@app.callback()
def _root(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log engine events.")] = False) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


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
    from cai_async.recipes import Recipe, load_recipe

    base = load_recipe(recipe) if recipe is not None else Recipe()
    data = base.model_dump(mode="json")
    data = _endpoint_overrides(data, endpoint)
    pairs = [f"{k}={json.dumps(v)}" for k, v in extra.items() if v is not None]
    data = apply_overrides(data, [*pairs, *sets])
    return validate(Recipe, data, source=str(recipe) if recipe else "command line")


def _run(recipe_obj: Any) -> None:
    from cai_async.cli.progress import progress_display
    from cai_async.recipes import run_recipe

    mode = recipe_obj.engine.progress
    try:
        summary = anyio.run(lambda: run_recipe(recipe_obj, progress=lambda e: progress_display(e, mode)))
    except KeyboardInterrupt:
        console.print("interrupted: finished results are kept; rerun the same command to resume")
        raise typer.Exit(130) from None
    stage = summary["stages"].get("generate")
    run_dir = Path(summary["run_dir"])
    if stage is not None:
        console.print(
            f"[bold]generate[/]: {stage['written']} written, {stage['skipped_already_done']} already done, "
            f"{stage['failed']} failed in {stage['seconds']:.1f}s"
        )
        if stage["stopped"]:
            console.print(f"[yellow]stopped:[/] {escape(stage['stopped'])}")
        for failure in stage["failures"][:5]:
            console.print(f"[red]failed[/] {failure['id']}: {escape(failure['error'])}")
        _print_example(run_dir / "generate")
    engine = summary["engine"]
    console.print(
        f"calls: {sum(e['calls'] for e in engine['endpoints'].values())}, cache hits: {engine['cache_hits']}, "
        f"tokens: {engine['tokens']}, cost: ${engine['cost_usd']:.4f}"
    )
    console.print(f"outputs: {run_dir}/ (summary.json, config.yaml, generate/part-*.parquet, cache.sqlite)")


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


@app.command()
def generate(
    recipe: RecipeArg = None,
    input: Annotated[str | None, typer.Option(help="Prompt file (.jsonl/.csv/.parquet).")] = None,
    run_dir: Annotated[str | None, typer.Option(help="Run directory.")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N prompts.")] = None,
    backend: Annotated[str | None, typer.Option(help="Policy endpoint backend: openai | llamacpp.")] = None,
    model: Annotated[str | None, typer.Option(help="Model name, or GGUF path for llamacpp.")] = None,
    base_url: Annotated[str | None, typer.Option(help="OpenAI-compatible base URL (…/v1).")] = None,
    api_key_env: Annotated[str | None, typer.Option(help="Name of the env var holding the API key.")] = None,
    rpm: Annotated[float | None, typer.Option(help="Requests per minute limit.")] = None,
    tpm: Annotated[float | None, typer.Option(help="Tokens per minute limit.")] = None,
    max_concurrency: Annotated[int | None, typer.Option(help="Global concurrency cap.")] = None,
    budget_usd: Annotated[float | None, typer.Option(help="Stop scheduling new calls at this cost.")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Disable the request cache.")] = False,
    progress: Annotated[str | None, typer.Option(help="auto | rich | plain | off")] = None,
    sets: SetOpt = None,
) -> None:
    """Answer prompts with the policy group and write Parquet (defaults → RECIPE → flags)."""
    extra: dict[str, Any] = {
        "run_dir": run_dir,
        "generate.input": input,
        "generate.limit": limit,
        "engine.max_concurrency": max_concurrency,
        "engine.budget_usd": budget_usd,
        "engine.progress": progress,
        "engine.cache.enabled": False if no_cache else None,
    }
    endpoint = {"backend": backend, "model": model, "base_url": base_url, "api_key_env": api_key_env,
                "rpm": rpm, "tpm": tpm}
    recipe_obj = _load(recipe, sets or [], extra, endpoint)
    if recipe_obj.generate is None or not recipe_obj.generate.input:
        raise CaiError_("no prompts: pass --input FILE or set generate.input in the recipe")
    _run(recipe_obj)


@app.command()
def run(recipe: Annotated[Path, typer.Argument(help="Recipe YAML/JSON/TOML.")], sets: SetOpt = None) -> None:
    """Run every stage a recipe lists, in order."""
    _run(_load(recipe, sets or [], {}, {}))


@app.command("config")
def show_config(recipe: RecipeArg = None, sets: SetOpt = None) -> None:
    """Print the resolved configuration (defaults → RECIPE → --set)."""
    typer.echo(yaml.safe_dump(_load(recipe, sets or [], {}, {}).model_dump(mode="json"), sort_keys=False))


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


class CaiError_(CaiError):
    """A user error found by the CLI itself."""


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (possibly nested) exception groups raised by task groups."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def main() -> None:
    """Entry point: run the app; user errors become one line on stderr and exit code 2."""
    try:
        app()
    except (CaiError, KeyboardInterrupt, BaseExceptionGroup) as exc:
        leaves = _leaves(exc)
        if any(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
            console.print("interrupted: finished results are kept; rerun the same command to resume")
            sys.exit(130)
        if not all(isinstance(leaf, CaiError) for leaf in leaves):
            raise
        for leaf in dict.fromkeys(str(leaf) for leaf in leaves):
            console.print(Text.assemble(("error: ", "bold red"), leaf), highlight=False)
        sys.exit(2)
