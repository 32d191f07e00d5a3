"""One command per registered stage that has one (``cai generate``, ``cai sl``, ``cai label``, ``cai eval``, and
any stage registered from outside), built from its :class:`~cai_async.stages.unit.StageCommand`: the recipe
argument, the stage's own flags, the shared endpoint/engine flags (:data:`~cai_async.cli.flags.SHARED_FLAGS`)
and ``--set``. The command runs the recipe with every other stage switched off."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any

import typer

from backends.errors import ConfigError
from cai_async.cli.flags import (
    HELP,
    Flag,
    SetOpt,
    flag_parameters,
    flag_values,
    load_with_flags,
    shared,
)
from cai_async.cli.summary import run_and_report
from cai_async.engine.config import ALWAYS_USED
from cai_async.stages.unit import StageFlag, StageUnit, stage_units

__all__ = ["add_stage_commands", "only_stage", "stage_command"]

_KEYWORD = inspect.Parameter.KEYWORD_ONLY


def _option(flag: StageFlag) -> tuple[Any, Any]:
    """(typer annotation, default) of a stage flag."""
    decls = flag.decls or (f"--{flag.name.replace('_', '-')}",)
    help_text = flag.help or HELP.get(flag.name, "")
    if flag.type is bool and not any("/" in d for d in decls):
        return Annotated[bool, typer.Option(*decls, help=help_text)], False
    return Annotated[flag.type | None, typer.Option(*decls, help=help_text)], None


def _value(flag: StageFlag, value: Any) -> Any:
    if value is None or (flag.type is bool and value is False and not any("/" in d for d in flag.decls)):
        return None
    return flag.convert(value) if flag.convert is not None else value


def only_stage(recipe_obj: Any, unit: StageUnit[Any], source: str) -> Any:
    """The recipe with every stage but ``unit`` switched off, and without the endpoint groups only those stages
    would have made (a model the run trains: ``cai sl`` before training must not load it); a user error when
    the stage lacks its input."""
    late: set[str] = set()
    for other in stage_units():
        config = other.config(recipe_obj)
        if other.name != unit.name and config is not None:
            late |= other.late_groups(config)
            setattr(recipe_obj, other.name, None)
    kept = unit.config(recipe_obj)
    message = unit.missing(kept, source)
    if message is not None:
        raise ConfigError(message)
    late -= ALWAYS_USED | unit.roles(kept)
    groups = recipe_obj.engine.groups
    if late & set(groups):
        recipe_obj.engine = recipe_obj.engine.model_copy(
            update={"groups": {name: group for name, group in groups.items() if name not in late}})
    return recipe_obj


def stage_command(unit: StageUnit[Any]) -> Any:
    """The typer command function of ``unit`` (its signature built from the stage's and the shared flags)."""
    spec = unit.command
    assert spec is not None
    flags: tuple[Flag, ...] = shared(*spec.shared) if spec.shared is not None else shared()
    recipe_annotation: Any = (Annotated[Path, typer.Argument(help=spec.recipe_help)] if spec.recipe_required else
                              Annotated[Path | None, typer.Argument(help=spec.recipe_help, show_default=False)])
    parameters = [inspect.Parameter("recipe", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=recipe_annotation,
                                    default=inspect.Parameter.empty if spec.recipe_required else None)]
    for stage_flag in spec.flags:
        annotation, default = _option(stage_flag)
        parameters.append(inspect.Parameter(stage_flag.name, _KEYWORD, annotation=annotation, default=default))
    parameters += flag_parameters(flags)
    parameters.append(inspect.Parameter("sets", _KEYWORD, annotation=SetOpt, default=None))

    def command(**values: Any) -> None:
        recipe: Path | None = values.pop("recipe", None)
        sets: list[str] = values.pop("sets", None) or []
        extra = {f.key: _value(f, values.pop(f.name, None)) for f in spec.flags}
        shared_extra, endpoint = flag_values(flags, values)
        recipe_obj = load_with_flags(recipe, sets, {**extra, **shared_extra}, endpoint)
        only_stage(recipe_obj, unit, str(recipe) if recipe is not None else "command line")
        run_and_report(recipe_obj, only=unit.name if spec.output == "stage" else None)

    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    command.__name__ = spec.name.replace("-", "_")
    command.__doc__ = spec.help
    return command


def add_stage_commands(app: typer.Typer) -> None:
    """Add the command of every registered stage that has one and is not on ``app`` yet."""
    have = {info.name for info in app.registered_commands}
    for unit in stage_units():
        if unit.command is not None and unit.command.name not in have:
            app.command(unit.command.name)(stage_command(unit))
