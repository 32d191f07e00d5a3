"""The example recipes, shipped with the package (``cai_async/data/recipes``: the files of the repository's
``recipes/``, kept equal by a test), and ``cai init``: write them into a folder with the data files they read, so
``pip install cai-async`` has a recipe to start from.

A recipe of the repository names the files the package ships relative to ``recipes/`` (``../cai_async/data/…``);
in the folder ``cai init`` writes, they are copied under ``data/`` (a public slice with its LICENSE and NOTICE)
and the recipes name them there (``../data/…``)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DATA", "RECIPES", "InitResult", "example_recipes", "write_examples"]

DATA = Path(__file__).resolve().parent / "data"
"""The package's data folder."""
RECIPES = DATA / "recipes"
"""The example recipes (and the accelerate configs under ``accelerate/``)."""

_IN_REPOSITORY = "../cai_async/data/"
"""How a recipe of the repository reaches the package's data folder."""
_IN_FOLDER = "../data/"
"""How a recipe written by ``cai init`` reaches the copies beside it."""
_NAMED = re.compile(re.escape(_IN_REPOSITORY) + r"([\w./-]+)")
_SLICE_NOTICES = ("LICENSE", "NOTICE.md")
"""Files that go with any file copied out of a public slice (``data/public/<slice>/``)."""


@dataclass
class InitResult:
    """What ``cai init`` did: the files written and those kept because they were already there."""

    written: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)


def example_recipes() -> list[Path]:
    """The example recipes and accelerate configs, relative to :data:`RECIPES`, sorted."""
    return sorted(path.relative_to(RECIPES) for path in RECIPES.rglob("*.yaml"))


def _data_files(texts: list[str]) -> list[str]:
    """The package data files the recipes name (relative to :data:`DATA`), with their slices' licence files."""
    named = {name for text in texts for name in _NAMED.findall(text) if (DATA / name).is_file()}
    for name in list(named):
        parts = Path(name).parts
        if parts[0] == "public" and len(parts) > 2:
            slice_dir = Path("public", parts[1])
            named |= {str(slice_dir / notice) for notice in _SLICE_NOTICES if (DATA / slice_dir / notice).is_file()}
    return sorted(named)


def write_examples(folder: str | Path, *, force: bool = False) -> InitResult:
    """Write the example recipes into ``folder/recipes`` and the data files they read into ``folder/data``; a
    file already there is kept unless ``force``."""
    root = Path(folder)
    texts = {name: (RECIPES / name).read_text(encoding="utf-8") for name in example_recipes()}
    files = {root / "recipes" / name: text.replace(_IN_REPOSITORY, _IN_FOLDER).encode("utf-8")
             for name, text in texts.items()}
    files |= {root / "data" / name: (DATA / name).read_bytes() for name in _data_files(list(texts.values()))}
    result = InitResult()
    for target, content in files.items():
        if target.exists() and not force:
            result.kept.append(target)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        result.written.append(target)
    return result
