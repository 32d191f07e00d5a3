"""The house keeps its shape: ``lint-imports`` checks the contracts of ``[tool.importlinter]`` in pyproject.toml
(each floor of cai_async imports only the floors below it, lazy imports included; guard and stages do not import
each other; backends imports nothing of cai_async; no package's modules import each other in a circle), and every
error the packages define is a class of the one tree under ``CaiError``."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path

import backends
import cai_async
from backends.errors import CaiError

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_hold() -> None:
    lint_imports = Path(sys.executable).with_name("lint-imports")
    assert lint_imports.is_file(), "import-linter is missing: pip install -e '.[dev]'"
    done = subprocess.run([str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_every_error_is_in_the_tree() -> None:
    """A public exception class outside the tree would escape the CLI's one-line messages and exit codes."""
    outside = []
    for package in (cai_async, backends):
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            if info.name.endswith(".__main__"):
                continue  # runs the CLI
            module = importlib.import_module(info.name)
            for name, value in vars(module).items():
                if (inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == info.name
                        and not name.startswith("_") and not issubclass(value, CaiError)):
                    outside.append(f"{info.name}.{name}({', '.join(b.__name__ for b in value.__bases__)})")
    assert not outside, f"derive these from backends.errors (CaiError and below): {outside}"
