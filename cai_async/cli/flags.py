"""The command-line options every command shares, each declared once: the recipe argument, ``--set``, the run
directory, the policy endpoint (backend, model, base URL, key variable, rate limits) and the engine (concurrency,
budget, Batch API, cache, progress); and how flags become a recipe (defaults → RECIPE → flags → ``--set``).

A stage's command (:mod:`cai_async.cli.stages`) takes every flag of :data:`SHARED_FLAGS` (or the subset its
:class:`~cai_async.stages.unit.StageCommand` names); one more shared flag is one more line there."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from backends.errors import ConfigError

__all__ = [
    "HELP",
    "SHARED_FLAGS",
    "BatchOpt",
    "BudgetOpt",
    "Flag",
    "ProgressOpt",
    "RayOpt",
    "RecipeArg",
    "RetryErrorsOpt",
    "RunDirOpt",
    "SetOpt",
    "flag_parameters",
    "flag_values",
    "load_with_flags",
    "ray_argv",
    "shared",
    "with_flags",
]


HELP = {
    "input": "Prompts: .jsonl/.json/.csv/.parquet or a saved HF dataset.",
    "limit": "Only the first N prompts.",
    "retry_errors": "Rerun every row recorded with an error (default: only endpoint-side classes).",
}
"""Help of the options stages share by name but point at their own keys (``--input``: ``sl.input``, …)."""

RecipeArg = Annotated[Path | None, typer.Argument(help="Recipe YAML/JSON/TOML.", show_default=False)]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a key: engine.max_concurrency=32")]
RunDirOpt = Annotated[str | None, typer.Option(help="Run directory.")]
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
RetryErrorsOpt = Annotated[bool, typer.Option("--retry-errors", help=HELP["retry_errors"])]
ProgressOpt = Annotated[str | None, typer.Option(help="auto | rich | plain | off")]
RayOpt = Annotated[str | None, typer.Option(
    "--ray", metavar="[ADDRESS]", help="Run the items on Ray engine actors (executor: ray): a new local cluster, "
    "or the one at ADDRESS (auto, HOST:PORT, ray://HOST:PORT).")]

_BATCH = "endpoints.mode=batch"
"""The ``extra`` key of ``--batch`` (not a recipe key: it switches every OpenAI-compatible endpoint)."""

Apply = Callable[[Any, dict[str, Any], dict[str, Any]], None]
"""Puts a flag's value into the recipe overrides (``extra``: key → value) or the policy endpoint's fields."""


@dataclass(frozen=True)
class Flag:
    """A shared option: its parameter name, its typer annotation and default, and where its value goes."""

    name: str
    annotation: Any
    default: Any
    apply: Apply


def _key(key: str, *, given: Any = None) -> Apply:
    """The value (or ``given`` when the flag is a switch that was set) at recipe key ``key``."""

    def apply(value: Any, extra: dict[str, Any], endpoint: dict[str, Any]) -> None:
        extra[key] = (given if value else None) if given is not None else value

    return apply


def _endpoint(field: str) -> Apply:
    def apply(value: Any, extra: dict[str, Any], endpoint: dict[str, Any]) -> None:
        endpoint[field] = value

    return apply


def _ray(value: str | None, extra: dict[str, Any], endpoint: dict[str, Any]) -> None:
    """``--ray [ADDRESS]`` as recipe overrides: ``executor: ray`` and, unless a new local cluster, the address."""
    if value is not None:
        extra["executor"] = "ray"
        if value != "local":
            extra["ray.address"] = value


def ray_argv(argv: list[str]) -> list[str]:
    """``--ray`` takes a value only when the next word is a cluster address (``auto``, ``local``, ``HOST:PORT``,
    ``ray://…``); alone it means a new local cluster (typer has no options with an optional value)."""
    out = []
    for index, word in enumerate(argv):
        following = argv[index + 1] if index + 1 < len(argv) else ""
        address = following in ("auto", "local") or (":" in following and not following.startswith("-"))
        out.append("--ray=local" if word == "--ray" and not address else word)
    return out


SHARED_FLAGS: tuple[Flag, ...] = (
    Flag("run_dir", RunDirOpt, None, _key("run_dir")),
    Flag("backend", BackendOpt, None, _endpoint("backend")),
    Flag("model", ModelOpt, None, _endpoint("model")),
    Flag("base_url", BaseUrlOpt, None, _endpoint("base_url")),
    Flag("api_key_env", KeyEnvOpt, None, _endpoint("api_key_env")),
    Flag("rpm", RpmOpt, None, _endpoint("rpm")),
    Flag("tpm", TpmOpt, None, _endpoint("tpm")),
    Flag("max_concurrency", ConcurrencyOpt, None, _key("engine.max_concurrency")),
    Flag("budget_usd", BudgetOpt, None, _key("engine.budget_usd")),
    Flag("batch", BatchOpt, False, _key(_BATCH, given=True)),
    Flag("no_cache", NoCacheOpt, False, _key("engine.cache.enabled", given=False)),
    Flag("progress", ProgressOpt, None, _key("engine.progress")),
    Flag("ray", RayOpt, None, _ray),
)
"""The endpoint and engine flags of every stage command, in the order ``--help`` lists them."""


def flag_values(flags: tuple[Flag, ...], values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(recipe overrides, policy endpoint fields) of the given ``values`` of ``flags``."""
    extra: dict[str, Any] = {}
    endpoint: dict[str, Any] = {}
    for flag in flags:
        if flag.name in values:
            flag.apply(values[flag.name], extra, endpoint)
    return extra, endpoint


def flag_parameters(flags: tuple[Flag, ...]) -> list[inspect.Parameter]:
    """The keyword-only parameters of ``flags``, for a command's signature."""
    return [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=f.annotation, default=f.default)
            for f in flags]


def with_flags(flags: tuple[Flag, ...]) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a hand-written command the shared ``flags`` (listed before ``--set``): it receives their values as
    one ``flags`` mapping (see :func:`flag_values`)."""

    def decorate(func: Callable[..., None]) -> Callable[..., None]:
        own = [p for p in inspect.signature(func, eval_str=True).parameters.values() if p.name != "flags"]
        tail = [p for p in own if p.name == "sets"]
        parameters = [p for p in own if p.name != "sets"] + flag_parameters(flags) + tail
        parameters = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if i else p for i, p in enumerate(parameters)]

        def command(**values: Any) -> None:
            func(**{k: v for k, v in values.items() if k not in names}, flags={n: values[n] for n in names})

        names = {f.name for f in flags}
        command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        command.__name__, command.__doc__, command.__module__ = func.__name__, func.__doc__, func.__module__
        return command

    return decorate


def shared(*names: str) -> tuple[Flag, ...]:
    """The shared flags named (all of them when none is)."""
    return tuple(f for f in SHARED_FLAGS if not names or f.name in names)


def _endpoint_overrides(recipe_data: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
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


def use_batch(recipe_data: dict[str, Any]) -> dict[str, Any]:
    """``--batch``: every OpenAI-compatible endpoint of the recipe switches to the Batch API."""
    endpoints = [e for group in recipe_data.get("engine", {}).get("groups", {}).values() for e in group
                 if e.get("backend", "openai") == "openai"]
    if not endpoints:
        raise ConfigError("--batch needs an OpenAI-compatible endpoint (backend: openai); this recipe has none")
    for endpoint in endpoints:
        endpoint["mode"] = "batch"
    return recipe_data


def load_with_flags(recipe: Path | None, sets: list[str], extra: dict[str, Any], endpoint: dict[str, Any]) -> Any:
    """The recipe: defaults → RECIPE → ``extra`` (key → value; None: not given) and the policy ``endpoint``
    fields → ``--set`` overrides."""
    from cai_async.configio import apply_overrides, validate
    from cai_async.recipes import Recipe, lift_method_keys, load_recipe

    base = load_recipe(recipe) if recipe is not None else Recipe()
    data = base.model_dump(mode="json")
    data = _endpoint_overrides(data, endpoint)
    extra = dict(extra)
    if extra.pop(_BATCH, None):
        data = use_batch(data)
    pairs = [f"{k}={json.dumps(v)}" for k, v in extra.items() if v is not None]
    data = lift_method_keys(apply_overrides(data, [*pairs, *sets]), source="--set", replace=True)
    return validate(Recipe, data, source=str(recipe) if recipe else "command line")
