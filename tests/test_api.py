"""The public API is written once: ``cai_async._API`` gives ``__all__`` and the lazy imports; the type checkers'
``TYPE_CHECKING`` imports say the same; every exported name imports; importing the package stays lazy. And the
import graph keeps its shape: judging lives in one module, training does not reach into the stages, evaluation
does not reach into label quality."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import cai_async
from tests.conftest import module_imports

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "cai_async"


def _type_checking_imports() -> dict[str, set[str]]:
    tree = ast.parse((PACKAGE / "__init__.py").read_text(encoding="utf-8"))
    (block,) = [node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"]
    found: dict[str, set[str]] = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom) and node.module, ast.unparse(node)
        for alias in node.names:
            assert alias.asname == alias.name, f"write `{alias.name} as {alias.name}` (an explicit re-export)"
            found.setdefault(node.module, set()).add(alias.name)
    return found


def _block(api: dict[str, tuple[str, ...]]) -> str:
    lines = ["if TYPE_CHECKING:"]
    for module in sorted(api):
        lines.append(f"    from {module} import (")
        lines += [f"        {name} as {name}," for name in api[module]]
        lines.append("    )")
    return "\n".join(lines)


def test_type_checking_imports_match_the_table() -> None:
    table = {module: set(names) for module, names in cai_async._API.items()}
    assert _type_checking_imports() == table, "paste this into cai_async/__init__.py:\n" + _block(cai_async._API)


def test_all_is_derived_from_the_table() -> None:
    names = [name for names in cai_async._API.values() for name in names]
    assert len(names) == len(set(names)), "a name is exported from two modules"
    assert cai_async.__all__ == sorted([*names, "__version__"])
    assert set(dir(cai_async)) == set(cai_async.__all__)
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        _ = cai_async.not_a_name  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", sorted(set(cai_async.__all__) - {"__version__"}))
def test_every_exported_name_imports(name: str) -> None:
    value = getattr(cai_async, name)
    assert value is getattr(importlib.import_module(cai_async._LAZY[name]), name)
    assert name in getattr(importlib.import_module(cai_async._LAZY[name]), "__all__", [name]), (
        f"{name} is not in {cai_async._LAZY[name]}.__all__")


def _loaded_after(statement: str, modules: tuple[str, ...]) -> set[str]:
    code = f"import sys; {statement}; print(','.join(m for m in {modules!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return set(filter(None, out.stdout.strip().split(",")))


def test_import_stays_lazy() -> None:
    heavy = ("polars", "aiohttp", "llama_cpp", "torch", "transformers", "matplotlib")
    assert _loaded_after("import cai_async", (*heavy, "pydantic", "backends")) == set()
    assert _loaded_after("import cai_async.judging", heavy) == set()  # online rewards judge without Polars


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [
        ("train", ("cai_async.stages",)),
        ("evaluation", ("cai_async.labelquality",)),
        ("judging.py", ("cai_async.stages", "cai_async.evaluation", "cai_async.train", "cai_async.labelquality")),
    ],
)
def test_import_graph(folder: str, forbidden: tuple[str, ...]) -> None:
    target = PACKAGE / folder
    files = sorted(target.glob("*.py")) if target.is_dir() else [target]
    assert files
    for file in files:
        bad = {m for m in module_imports(file) if any(m == f or m.startswith(f + ".") for f in forbidden)}
        assert not bad, f"{file.relative_to(ROOT)} imports {sorted(bad)}"


def test_judging_is_spelled_once() -> None:
    """The answer prefix and the question templates live in cai_async/judging.py only."""
    for file in sorted(PACKAGE.rglob("*.py")):
        text = file.read_text(encoding="utf-8")
        if file.name == "judging.py":
            assert text.count('"The answer is ("') == 1
            continue
        assert "The answer is (" not in text, file
        assert "Consider the following conversation" not in text, file
