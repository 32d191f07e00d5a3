"""The docs say what the code does: the site builds with ``mkdocs build --strict`` (broken links and anchors
fail it), every ``cai …`` line in a code block of the README and of docs/ names an existing command with
existing flags and a fitting number of arguments, every YAML block is a recipe that validates against the recipe
schema (or says which other schema it is, ``# schema: NAME``, and validates against that), every Python block
compiles and imports names that exist, and the README's relative links lead to files.

The checkers are tested on planted mistakes too, so a check that stopped finding anything would fail."""

from __future__ import annotations

import ast
import importlib
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import TypeAdapter, ValidationError

from backends.errors import ConfigError
from cai_async import docs_gen
from cai_async.cli.flags import ray_argv
from cai_async.configio import validate
from cai_async.constitution import ComparisonSet, Constitution
from cai_async.engine.config import EndpointConfig
from cai_async.loop import LOOP_KEY, LoopConfig
from cai_async.recipes import METHOD_KEYS, Recipe, lift_method_keys
from cai_async.stages.unit import stage_units

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
SHELL = {"", "bash", "sh", "shell", "console", "zsh"}
SCHEMAS: dict[str, Any] = {
    "constitution": Constitution,
    "comparison-set": ComparisonSet,
    "endpoint": list[EndpointConfig],
}
"""What a YAML block that is not a recipe may declare itself, on its first line: ``# schema: NAME`` (``none``
opts out)."""


# --------------------------------------------------------------------------------------------- reading the pages


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    lang: str
    text: str

    def where(self, offset: int = 0) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line + offset}"


_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")


def code_blocks(path: Path, text: str | None = None) -> Iterator[Block]:
    """The fenced code blocks of a Markdown file (indented fences inside lists too)."""
    lines = (path.read_text(encoding="utf-8") if text is None else text).split("\n")
    index = 0
    while index < len(lines):
        match = _FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        fence, indent = match["fence"], len(match["indent"])
        body: list[str] = []
        start = index + 1
        index += 1
        while index < len(lines) and not (
            lines[index].strip().startswith(fence[0] * len(fence)) and not lines[index].strip().strip(fence[0])
        ):
            line = lines[index]
            body.append(line[indent:] if not line[:indent].strip() else line.lstrip())
            index += 1
        index += 1
        yield Block(path, start + 1, match["lang"].lower(), "\n".join(body))


def all_blocks() -> list[Block]:
    return [block for page in PAGES for block in code_blocks(page)]


# ----------------------------------------------------------------------------------------------- cai command lines

_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_WRAPPERS = {"time", "env", "nohup", "exec"}


def shell_lines(block: Block) -> Iterator[tuple[int, str]]:
    """(line offset, logical line) of a shell block: continuations joined, prompts (``$ ``) dropped."""
    pending = ""
    first = 0
    for offset, raw in enumerate(block.text.split("\n")):
        line = raw.strip()
        if not pending:
            first = offset
            line = line.removeprefix("$ ")
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        yield first, pending + line
        pending = ""
    if pending:
        yield first, pending


def cai_invocations(line: str) -> Iterator[list[str]]:
    """The argument lists of every ``cai`` run on a shell line: ``cai ARGS``, ``VAR=… cai ARGS``,
    ``… -m cai_async.cli ARGS`` (accelerate, torchrun, python), also after ``&&``, ``;`` or ``|``."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    words = list(lexer)
    segments: list[list[str]] = [[]]
    for word in words:
        if word and set(word) <= set(";&|"):
            segments.append([])
        else:
            segments[-1].append(word)
    for segment in segments:
        while segment and (_ASSIGNMENT.match(segment[0]) or segment[0] in _WRAPPERS):
            segment = segment[1:]
        if not segment:
            continue
        if Path(segment[0]).name == "cai":
            yield segment[1:]
            continue
        for index in range(len(segment) - 1):
            if segment[index] == "-m" and segment[index + 1] == "cai_async.cli":
                yield segment[index + 2:]
                break


def _find_option(params: list[Any], name: str) -> Any | None:
    for param in params:
        if param.param_type_name == "option" and name in (*param.opts, *param.secondary_opts):
            return param
    return None


def check_cai_args(root: Any, args: list[str]) -> str | None:
    """What is wrong with ``cai ARGS`` against the command tree (None: nothing): an unknown command or option,
    an option without its value, more arguments than the command takes, or a required one missing."""
    args = ray_argv(args)
    command, context, path = root, docs_gen.command_context(root), ["cai"]
    params = command.get_params(context)
    positional: list[str] = []
    asked_help = False
    index = 0
    while index < len(args):
        word = args[index]
        index += 1
        if word == "--":
            positional += args[index:]
            break
        if word.startswith("-") and len(word) > 1:
            name, equals, _ = word.partition("=")
            option = _find_option(params, name)
            attached = False
            if option is None and not name.startswith("--") and len(name) > 2:
                option, attached = _find_option(params, name[:2]), True  # -sVALUE
            if option is None:
                known = sorted(n for p in params if p.param_type_name == "option" for n in (*p.opts, *p.secondary_opts))
                return f"`{' '.join(path)}` has no option {name} (it has: {', '.join(known)})"
            if name == "--help":
                asked_help = True
            takes_value = not getattr(option, "is_flag", False) and not getattr(option, "count", False)
            if takes_value and not equals and not attached:
                if index + option.nargs > len(args):
                    return f"`{' '.join(path)}`: option {name} needs {option.nargs} value(s)"
                index += option.nargs
            continue
        if docs_gen.is_group(command) and not positional:
            sub = command.get_command(context, word)
            if sub is None:
                names = ", ".join(name for name, _ in docs_gen.subcommands(command, context))
                return f"`{' '.join(path)}` has no command {word!r} (it has: {names})"
            command, context = sub, docs_gen.command_context(sub, context, word)
            params = command.get_params(context)
            path.append(word)
            continue
        positional.append(word)
    if asked_help:
        return None
    arguments = [param for param in params if param.param_type_name == "argument"]
    if docs_gen.is_group(command):
        return None  # a group alone prints its commands
    room = sum(param.nargs for param in arguments) if all(param.nargs >= 0 for param in arguments) else None
    if room is not None and len(positional) > room:
        return f"`{' '.join(path)}` takes at most {room} argument(s), got {positional}"
    needed = [param for param in arguments if param.required]
    if len(positional) < sum(max(param.nargs, 1) for param in needed):
        return f"`{' '.join(path)}` is missing its argument(s): {', '.join(p.name.upper() for p in needed)}"
    return None


@pytest.fixture(scope="module")
def root() -> Any:
    return docs_gen.root_command()


def cai_lines(blocks: list[Block]) -> list[tuple[str, str, list[str]]]:
    """(where, line, args) of every ``cai`` run in the shell blocks."""
    found = []
    for block in blocks:
        if block.lang not in SHELL:
            continue
        for offset, line in shell_lines(block):
            for args in cai_invocations(line):
                found.append((block.where(offset), line, args))
    return found


def test_every_cai_line_names_an_existing_command_and_flags(root: Any) -> None:
    found = cai_lines(all_blocks())
    assert len(found) >= 60, f"only {len(found)} cai lines found in the docs' code blocks: is the parser broken?"
    problems = [f"{where}: {problem}\n    {line}" for where, line, args in found
                if (problem := check_cai_args(root, args)) is not None]
    assert not problems, "cai lines in the docs that the CLI would refuse:\n" + "\n".join(problems)


def test_the_cai_line_check_finds_planted_mistakes(root: Any) -> None:
    planted = """
```bash
cai nosuchcommand recipes/quickstart.yaml
cai sl --no-such-flag 3
cai guard serve recipes/guard.yaml one-too-many
cai guard calibrate runs/guard
OPENAI_API_KEY=x cai run recipes/quickstart.yaml --max-cost
torchrun --nproc_per_node 2 -m cai_async.cli train nosuchstage recipes/quickstart.yaml --bogus
cai constitution frobnicate
```
"""
    found = cai_lines(list(code_blocks(ROOT / "planted.md", planted)))
    assert len(found) == 7
    problems = [check_cai_args(root, args) for _, _, args in found]
    assert all(problems), list(zip([line for _, line, _ in found], problems, strict=True))
    assert "no command 'nosuchcommand'" in str(problems[0])
    assert "no option --no-such-flag" in str(problems[1])
    assert "at most" in str(problems[2])
    assert "missing" in str(problems[3])
    assert "needs 1 value" in str(problems[4])
    more = "```bash\ncai sl --input p.jsonl --set sl.num_revisions=2 -v\ncai -v run recipes/quickstart.yaml --ray\n```"
    (_, _, misplaced), (_, _, fine) = cai_lines(list(code_blocks(ROOT / "more.md", more)))
    assert check_cai_args(root, misplaced) is not None  # -v belongs to the root command only
    assert check_cai_args(root, fine) is None


# -------------------------------------------------------------------------------------------------- YAML blocks

RECIPE_KEYS = set(Recipe.model_fields) | set(METHOD_KEYS) | {unit.name for unit in stage_units()} | {LOOP_KEY}


def check_yaml(block: Block) -> str | None:
    """What is wrong with a YAML block (None: nothing). A recipe (every top-level key a recipe key) validates
    as a recipe; any other block names its schema on its first line."""
    try:
        data = yaml.safe_load(block.text)
    except yaml.YAMLError as exc:
        return f"not YAML: {exc}"
    first = block.text.lstrip().split("\n", 1)[0]
    declared = re.match(r"#\s*schema:\s*([\w-]+)", first)
    if declared:
        name = declared[1]
        if name == "none":
            return None
        if name not in SCHEMAS:
            return f"unknown schema {name!r} (known: {', '.join(sorted(SCHEMAS))}, none)"
        try:
            TypeAdapter(SCHEMAS[name]).validate_python(data)
        except ValidationError as exc:
            return f"not a valid {name}: {exc}"
        return None
    if not isinstance(data, dict) or not data or not set(data) <= RECIPE_KEYS:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        return (f"not a recipe (top-level keys {keys}; a recipe's are {sorted(RECIPE_KEYS)}): fix it, or name "
                f"its schema on the first line (# schema: {' | '.join(sorted(SCHEMAS))} | none)")
    try:
        if LOOP_KEY in data:  # `cai loop`'s section, beside the recipe it loops over
            validate(LoopConfig, data.pop(LOOP_KEY) or {}, source="loop section")
        validate(Recipe, lift_method_keys(data, source="recipe block"), source="recipe block")
    except ConfigError as exc:
        return str(exc)
    return None


def test_every_yaml_block_validates() -> None:
    blocks = [block for block in all_blocks() if block.lang in ("yaml", "yml")]
    recipes = [block for block in blocks if not block.text.lstrip().startswith("# schema:")]
    assert len(recipes) >= 12, f"only {len(recipes)} recipe blocks found: is the parser broken?"
    problems = [f"{block.where()}: {problem}" for block in blocks if (problem := check_yaml(block)) is not None]
    assert not problems, "YAML blocks in the docs that do not validate:\n" + "\n".join(problems)


def test_the_yaml_check_finds_planted_mistakes() -> None:
    def block(text: str) -> Block:
        return Block(ROOT / "planted.md", 1, "yaml", text)

    assert check_yaml(block("sl:\n  num_revisions: 0\n")) is not None  # below its bound
    assert check_yaml(block("sl:\n  num_revisons: 2\n")) is not None  # misspelled key
    assert check_yaml(block("engine:\n  groups: {policy: [{backend: openai, rpm: -1}]}\n")) is not None
    assert check_yaml(block("train:\n  rl_algorithm: sgd\n")) is not None
    assert "not a recipe" in str(check_yaml(block("sl_config:\n  input: x\n")))
    assert check_yaml(block("# schema: constitution\nname: x\nprinciples: []\n")) is not None
    assert check_yaml(block("# schema: nonsense\nname: x\n")) is not None
    assert check_yaml(block("sl:\n  input: p.jsonl\n  num_revisions: 2\nnum_revisions: 2\n")) is not None
    assert check_yaml(block("sl:\n  input: p.jsonl\nrl_algorithm: dpo\n")) is None  # the method's alias
    assert check_yaml(block("# schema: none\nanything: [at, all]\n")) is None


# ------------------------------------------------------------------------------------------------- Python blocks


def test_every_python_block_compiles_and_imports_what_exists() -> None:
    problems = []
    blocks = [block for block in all_blocks() if block.lang in ("python", "py")]
    assert blocks, "no Python block found"
    for block in blocks:
        try:
            tree = ast.parse(block.text)
        except SyntaxError as exc:
            problems.append(f"{block.where()}: {exc}")
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("cai_async",
                                                                                                  "backends"):
                module = importlib.import_module(node.module)
                problems += [f"{block.where()}: {node.module} has no {alias.name}"
                             for alias in node.names if not hasattr(module, alias.name)]
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------- links and pages


def test_readme_links_lead_to_files() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if "://" not in link]
    assert len(local) >= 10, "the README links into docs/"
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, f"README links to files that are not there: {missing}"


def test_readme_is_short() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= 250, f"README.md has {lines} lines; move detail into docs/ (at most 250)"


def test_every_page_is_in_the_nav() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))

    def pages(node: Any) -> Iterator[str]:
        if isinstance(node, str):
            yield node
        elif isinstance(node, list):
            for item in node:
                yield from pages(item)
        elif isinstance(node, dict):
            for value in node.values():
                yield from pages(value)

    listed = set(pages(config["nav"]))
    written = {str(path.relative_to(DOCS)) for path in DOCS.rglob("*.md")}
    assert written <= listed, f"pages missing from mkdocs.yml's nav: {sorted(written - listed)}"
    generated = set(docs_gen.REFERENCE_PAGES)
    assert listed - written == generated, "the nav lists pages that are neither written nor generated"


def test_the_references_cover_every_key_and_command(root: Any) -> None:
    config = docs_gen.config_reference()
    for key in [*Recipe.model_fields, *(unit.name for unit in stage_units())]:
        assert f"| `{key}` |" in config, f"recipe key {key} is missing from the configuration reference"
    cli = docs_gen.cli_reference()
    for path, _, _ in docs_gen.iter_commands(root):
        assert f" {' '.join(path)}\n" in cli, f"{' '.join(path)} has no section in the CLI reference"


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    """Broken links, anchors and nav entries fail a strict build; so does a failing generator."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    site = tmp_path / "site"
    configuration = (site / "reference" / "configuration.html").read_text(encoding="utf-8")
    assert "SLConfig" in configuration and "GuardConfig" in configuration
    assert "cai guard serve" in (site / "reference" / "cli.html").read_text(encoding="utf-8")
    how = (site / "how-it-works.html").read_text(encoding="utf-8")
    assert "imports lazily" in how and "generated: room-imports" not in how
