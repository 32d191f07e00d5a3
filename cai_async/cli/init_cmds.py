"""``cai init [DIR]``: the example recipes and the prompts they read, written into a folder to start from."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cai_async.cli.console import console

__all__ = ["init"]


def init(
    folder: Annotated[Path, typer.Argument(help="Folder to write into (created when missing).")] = Path("."),
    force: Annotated[bool, typer.Option("--force", help="Overwrite files that are already there.")] = False,
) -> None:
    """Write the example recipes into DIR/recipes and the prompt files they read into DIR/data."""
    from cai_async.examples import write_examples

    result = write_examples(folder, force=force)
    kept = f"; kept {len(result.kept)} already there (--force overwrites them)" if result.kept else ""
    console.print(f"cai init: wrote {len(result.written)} files under {folder}/ (recipes/, data/){kept}")
    where = "" if folder == Path(".") else f"cd {folder} && "
    console.print(f"next: {where}cai plan recipes/quickstart.yaml (the calls and the cost), then "
                  "cai run recipes/quickstart.yaml")
