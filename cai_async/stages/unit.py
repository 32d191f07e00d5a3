"""A stage as a unit, and the one ordered registry of stages.

A :class:`StageUnit` says everything the rest of the package needs to know of a stage: its recipe key and config
type, the endpoint groups it calls, how it runs (``run``, one summary entry at a time), what it will cost
(``plan``), the files it exports, and its command (:class:`StageCommand`: name, help, stage-specific flags; the
shared endpoint/engine flags come from the CLI). ``cai run`` runs the registry's stages in order, ``cai plan``
sums their estimates, and the CLI builds one command per stage that has one. Each entry also declares what it
reads (:meth:`StageUnit.inputs`: :class:`StageInput`) and writes (:meth:`StageUnit.outputs`), so a recipe is
checked end to end before any call (:func:`unmet_inputs`).

The built-in stages (generate, sl, rl, train, eval) load lazily in that order; another package adds one with
:func:`register_stage`, or by naming a unit in the ``cai_async.stages`` entry-point group.
"""

from __future__ import annotations

import importlib
import os
from abc import ABC, abstractmethod
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, Protocol, TypeVar

from pydantic import BaseModel

from backends.errors import CaiError, ConfigError

if TYPE_CHECKING:
    from cai_async.engine import BatchReport, Engine, EngineConfig

__all__ = [
    "ENTRY_POINT_GROUP",
    "Count",
    "ItemExecutor",
    "RecipeView",
    "StageCommand",
    "StageContext",
    "StageFlag",
    "StageInput",
    "StagePlan",
    "StageResult",
    "StageUnit",
    "load_prompt_texts",
    "recipe_section",
    "register_stage",
    "resolve_path",
    "stage_unit",
    "stage_units",
    "unmet_inputs",
    "unregister_stage",
]

ENTRY_POINT_GROUP = "cai_async.stages"
"""Entry points in this group name a :class:`StageUnit` instance; each is registered when the registry loads."""

C = TypeVar("C", bound=BaseModel)
M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
R = TypeVar("R")

Count = Callable[[str], int]
"""Prompt tokens of a text (with the model's tokenizer where one is at hand, else approximated)."""


@dataclass
class StagePlan:
    """Estimated work of one stage on one endpoint group."""

    stage: str
    group: str
    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    rounds: int = 1
    """Calls that must follow each other (initial → critique → revision): batch mode's rounds of batches."""
    notes: list[str] = field(default_factory=list)

    def add(self, calls: int, input_tokens: int, output_tokens: int) -> None:
        """Add ``calls`` calls with these tokens in and out."""
        self.calls += calls
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens


@dataclass(frozen=True, kw_only=True)
class StageFlag:
    """A command-line option of a stage's command that sets one recipe key; not given (None), the recipe's
    value stays. ``type``: the value's type (``str``, ``int``, ``float``, ``bool``, ``tuple[str, str]``); a
    ``bool`` is a plain switch (giving ``--x`` sets True) unless ``decls`` names a pair (``"--x/--no-x"``);
    ``decls``: the option's names (default ``--x-y`` for ``x_y``); ``convert``: applied to a given value."""

    name: str
    key: str
    help: str = ""
    """Empty: the help of the shared option of that name (``input``, ``limit``, ``retry_errors``)."""
    type: Any = str
    decls: tuple[str, ...] = ()
    convert: Callable[[Any], Any] | None = None


@dataclass(frozen=True, kw_only=True)
class StageCommand:
    """A stage's command: ``cai NAME [RECIPE] [flags]`` runs the recipe with every other stage switched off."""

    name: str
    help: str
    flags: tuple[StageFlag, ...] = ()
    shared: tuple[str, ...] | None = None
    """The shared flags (endpoint, engine, run directory) the command takes; None: all of them."""
    recipe_required: bool = False
    recipe_help: str = "Recipe YAML/JSON/TOML."
    output: Literal["run", "stage"] = "run"
    """``run``: every stage line, the summary table and what to open next; ``stage``: this stage's lines only."""


@dataclass(frozen=True, kw_only=True)
class StageInput:
    """Something a stage entry needs before it can run: a file or folder (``path``) that an earlier entry of the
    recipe writes (:meth:`StageUnit.outputs`) or that is already there; or, without a path, something of this
    machine (installed packages, a model format) that ``ready`` tells. ``what`` names it in the error line,
    ``fix`` says how to get it."""

    what: str
    fix: str
    path: str | Path = ""
    key: str = ""
    """The recipe key that sets ``path`` (named when it is not set)."""
    ready: Callable[[], bool] | None = None
    """Whether it is there now; default: ``path`` exists (a URI is taken as there: it cannot be checked offline)."""

    def problem(self, entry: str, made: Sequence[Path]) -> str | None:
        """One line saying what ``entry`` lacks and how to fix it; None when it is made earlier or there."""
        path = str(self.path)
        if not path and self.ready is None:
            return f"{entry}: no {self.what} is set{f' ({self.key})' if self.key else ''}; {self.fix}"
        if not path:
            return None if self.ready is not None and self.ready() else f"{entry}: {self.what} is missing; {self.fix}"
        if "://" in path:
            return None
        target = Path(os.path.abspath(path))
        if target in made:
            return None
        if self.ready() if self.ready is not None else target.exists():
            return None
        return f"{entry}: {self.what} not found: {path} (and no earlier stage of this recipe writes it); {self.fix}"


class RecipeView(Protocol):
    """What a stage reads of the whole recipe besides its own section: the engine config (and, by name, other
    sections: :func:`recipe_section`). :class:`~cai_async.recipes.Recipe` is one (it lives above the stages)."""

    @property
    def engine(self) -> EngineConfig:
        """The endpoint groups and the engine's policies."""
        ...


def recipe_section(recipe: RecipeView, name: str, kind: type[M]) -> M | None:
    """The section ``name`` of ``recipe`` (a stage's, the guard's) when the recipe has one of type ``kind``."""
    value = getattr(recipe, name, None)
    return value if isinstance(value, kind) else None


class ItemExecutor(Protocol):
    """Runs a stage's items: ``call`` over ``items``, each outcome (a result, or the ``CaiError`` that ended it)
    handed to ``on_result`` here as soon as it is known; a reached budget stops it (``stopped``). This is
    :meth:`Engine.run_batch <cai_async.engine.Engine.run_batch>`'s shape: the engine is the executor in this
    process; ``executor: ray`` puts :class:`~cai_async.scale.ray_executor.RayRows` in the stage context."""

    async def run_batch(
        self,
        items: Iterable[T] | AsyncIterable[T],
        call: Callable[[T], Awaitable[R]],
        *,
        on_result: Callable[[T, R | CaiError], Awaitable[None] | None],
        total: int | None = None,
        concurrency: int | None = None,
    ) -> BatchReport[T]:
        """Run ``call`` over ``items`` (at most ``concurrency`` at once; ``total``: how many, for progress)."""
        ...


class StageResult(ABC):
    """What one entry of a stage did, as :meth:`StageUnit.run` returns it: its ``summary.json`` entry
    (:meth:`to_json`), how many of its items did not finish ok (:meth:`failure_count`) and whether it stopped
    early (:meth:`stopped_early`); the run's exit code follows from these."""

    @abstractmethod
    def to_json(self) -> dict[str, Any]:
        """The entry's ``summary.json`` data."""

    @abstractmethod
    def failure_count(self) -> int:
        """Items that did not finish ok: failed (not written), recorded errors (this run's, and earlier runs'
        kept without a retry), and the same for its parts (pairs, helpfulness responses, evaluated models)."""

    def stopped_early(self) -> str | None:
        """Why the entry stopped before its last item (a budget reached); None when it ran to the end."""
        return None


@dataclass(frozen=True, kw_only=True)
class StageContext:
    """What a stage run gets besides its config: the run directory, the whole recipe (its engine config, other
    stages' sections), the engine of its session (None for a stage that calls none), the executor its items run
    on and ``retry_errors``."""

    run_dir: Path
    recipe: RecipeView
    engine: Engine | None = None
    executor: ItemExecutor | None = None
    """Where the stage's items run (``executor: ray``: Ray engine actors); None: the engine, in this process."""
    retry_errors: bool = False

    def require_engine(self) -> Engine:
        """The engine; a stage that calls endpoints runs in an engine session."""
        if self.engine is None:
            raise CaiError("this stage calls endpoints but was run without an engine")
        return self.engine


class StageUnit(Generic[C]):
    """One stage. Subclasses set ``name`` (its recipe key and summary entry), ``config_type`` and, where they
    have one, ``command``; and implement :meth:`run` (and :meth:`plan`, :meth:`roles` where they call endpoints)."""

    name: ClassVar[str]
    config_type: ClassVar[type[BaseModel]]
    session: ClassVar[str | None] = "data"
    """Consecutive stages of one session share one engine (``summary.json``: ``engine`` for ``data``,
    ``engine_<session>`` for the others); None: the stage calls no endpoint."""
    after: ClassVar[str | None] = None
    """Where :func:`register_stage` puts the stage: after this one (None: last)."""
    exports: ClassVar[tuple[str, ...]] = ()
    """The files the stage writes under ``RUN_DIR/exports/`` (names without ``.parquet``)."""
    command: ClassVar[StageCommand | None] = None

    def config(self, recipe: RecipeView) -> C | None:
        """The stage's section of ``recipe``; None when the recipe does not run the stage."""
        value: C | None = getattr(recipe, self.name, None)
        return value

    def roles(self, config: C) -> set[str]:
        """The endpoint groups the stage calls."""
        return set()

    def late_groups(self, config: C) -> set[str]:
        """Groups that may not exist until earlier stages ran (a model the run trains): left out of the engines
        of other sessions."""
        return set()

    def entries(self, config: C) -> list[str]:
        """The summary entries the stage reports, run one after another (default: its name)."""
        return [self.name]

    async def run(self, context: StageContext, config: C, entry: str) -> StageResult:
        """Run one entry of the stage; its report (:meth:`StageResult.to_json`: its ``summary.json`` entry)."""
        raise NotImplementedError

    def plan(self, recipe: RecipeView, count: Count) -> list[StagePlan]:
        """Estimated calls and tokens of the stage on each group it calls."""
        return []

    def resolve(self, config: C, base: Path) -> None:
        """Resolve the relative file paths of ``config`` against ``base`` (the recipe's folder)."""

    def missing(self, config: C | None, source: str) -> str | None:
        """What the stage's command needs that the recipe (``source``) lacks, as one line; None when nothing."""
        return None if config is not None else f"{source}: no {self.name} section"

    def inputs(self, config: C, entry: str, run_dir: Path) -> list[StageInput]:
        """What ``entry`` reads before it runs (checked before any call, see :func:`unmet_inputs`). Default: the
        prompt file of a config that is a :class:`~cai_async.prompts.PromptSource`."""
        from cai_async.prompts import PromptSource

        if not isinstance(config, PromptSource):
            return []
        key = f"{self.name}.input"
        return [StageInput(what="prompt file", path=config.input, key=key,
                           fix=f"pass --input FILE or set {key} (a relative path in a recipe is read from the "
                               f"recipe's folder)")]

    def outputs(self, config: C, entry: str, run_dir: Path) -> list[Path]:
        """What ``entry`` writes that later entries may read. Default: ``RUN_DIR/<name>/`` and the
        :attr:`exports` the config does not switch off (``export.<name>: false``)."""
        export = getattr(config, "export", None)
        return [run_dir / self.name, *(run_dir / "exports" / f"{name}.parquet" for name in self.exports
                                       if getattr(export, name, True) is not False)]


def unmet_inputs(present: Sequence[tuple[StageUnit[Any], Any]], run_dir: Path) -> list[str]:
    """Walk the recipe's stage entries in run order: one line for each input (:meth:`StageUnit.inputs`) that no
    earlier entry writes (:meth:`StageUnit.outputs`) and that is not there already. Nothing is called."""
    made: list[Path] = []
    problems: list[str] = []
    seen: set[tuple[str, str]] = set()
    for unit, config in present:
        for entry in unit.entries(config):
            for need in unit.inputs(config, entry, run_dir):
                line = need.problem(entry, made)
                if line is not None and (need.what, str(need.path)) not in seen:
                    seen.add((need.what, str(need.path)))
                    problems.append(line)
            made += [Path(os.path.abspath(path)) for path in unit.outputs(config, entry, run_dir)]
    return problems


def resolve_path(base: Path, value: str) -> str:
    """``value`` resolved against ``base`` when it is a relative path (empty, a built-in constitution's name, or
    a URI such as ``s3://…`` stays as it is)."""
    from cai_async.constitution_io import builtin_constitutions

    if not value or Path(value).is_absolute() or value in builtin_constitutions() or "://" in value:
        return value
    return os.path.normpath(base / value)


def load_prompt_texts(source: Any) -> list[str]:
    """The prompts of a prompt source, for an estimate (none when they cannot be read)."""
    try:
        return [r.prompt for r in source.iter()]  # the texts only, not a row object each
    except CaiError:
        return []


_BUILTIN = ("cai_async.redteam.stage",
            "cai_async.stages.generate", "cai_async.stages.sl", "cai_async.stages.rl", "cai_async.stages.train",
            "cai_async.evaluation.stage")
"""The modules of the built-in units (each names its unit ``STAGE``), in run order. The evaluation's unit lives
with the evaluation, which imports the stages' row machinery (the arrow runs one way)."""
_units: list[StageUnit[Any]] = []
_loaded = False


def _load() -> list[StageUnit[Any]]:
    global _loaded
    if not _loaded:
        _loaded = True
        builtin = [importlib.import_module(module).STAGE for module in _BUILTIN]
        added = list(_units)
        _units[:] = builtin
        for point in entry_points(group=ENTRY_POINT_GROUP):
            unit = point.load()
            if not any(u.name == unit.name for u in [*_units, *added]):
                added.append(unit)
        for unit in added:
            _insert(unit)
    return _units


def _insert(unit: StageUnit[Any]) -> None:
    if any(u.name == unit.name for u in _units):
        raise ConfigError(f"a stage named {unit.name!r} is already registered")
    if unit.after is None:
        _units.append(unit)
        return
    names = [u.name for u in _units]
    if unit.after not in names:
        raise ConfigError(f"stage {unit.name!r} runs after {unit.after!r}, which is not registered")
    index = names.index(unit.after) + 1
    while index < len(_units) and _units[index].after == unit.after:  # earlier registrations keep their place
        index += 1
    _units.insert(index, unit)


def register_stage(unit: StageUnit[Any]) -> None:
    """Add a stage to the registry, after ``unit.after`` (or last); its name must be new."""
    if _loaded:
        _insert(unit)
    elif any(u.name == unit.name for u in _units):
        raise ConfigError(f"a stage named {unit.name!r} is already registered")
    else:
        _units.append(unit)


def unregister_stage(name: str) -> None:
    """Remove the stage ``name`` from the registry (a no-op when there is none)."""
    _load()
    _units[:] = [u for u in _units if u.name != name]


def stage_units() -> Sequence[StageUnit[Any]]:
    """Every registered stage, in the order a recipe runs them."""
    return tuple(_load())


def stage_unit(name: str) -> StageUnit[Any] | None:
    """The stage registered as ``name``, if any."""
    return next((u for u in _load() if u.name == name), None)
