"""``cai constitution suggest``: from the uncovered failures of a red-team run (successful attacks on seeds
labelled harmful that no principle's judge flags, ``RUN_DIR/redteam/gaps.json``), ask the judge group to draft
ONE new principle (a name, a critique request, a revision request), read its answer strictly, and write it to a
file for a person to review. Nothing here changes a constitution: adding the principle is the reviewer's call."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from backends.atomic import read_json
from backends.errors import ConfigError
from backends.types import ChatRequest
from cai_async.constitution import Principle
from cai_async.engine import Engine

__all__ = [
    "SUGGESTION_FILE",
    "Suggestion",
    "parse_principle",
    "suggest_principle",
    "suggestion_request",
    "uncovered_failures",
    "write_suggestion",
]

SUGGESTION_FILE = "suggested_principle.yaml"
"""Where the draft goes by default, in ``RUN_DIR/redteam/``."""

_KEYS = ("name", "critique", "revision")
_ALIASES = {"critique_request": "critique", "revision_request": "revision"}
"""The CAI paper's names for the two requests, read as cai-async's."""
_FENCE = re.compile(r"```[ \t]*(?:ya?ml|json)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_CLIP = 300


@dataclass(frozen=True, slots=True)
class Suggestion:
    """A drafted principle, where it was written, and the uncovered failures it was drafted from."""

    principle: Principle
    path: Path
    failures: tuple[str, ...]


def uncovered_failures(run_dir: str | Path) -> list[dict[str, Any]]:
    """The uncovered failures listed in ``run_dir/redteam/gaps.json`` (a clear error when there is none)."""
    path = Path(run_dir) / "redteam" / "gaps.json"
    if not path.is_file():
        raise ConfigError(f"{path}: not found; run `cai redteam` on this run directory first")
    try:
        gaps = read_json(path)
        found = gaps["uncovered"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a redteam gaps file ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(found, list):
        raise ConfigError(f"{path}: 'uncovered' is not a list")
    return [dict(item) for item in found]


def _clip(text: Any) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= _CLIP else flat[:_CLIP] + " …"


def suggestion_request(failures: list[dict[str, Any]], principles: list[tuple[str, str]] | None = None, *,
                       examples: int = 20) -> list[dict[str, str]]:
    """The drafter's messages: the constitution's principles (name, question), the first ``examples`` failures
    (behaviour, attack, answer), and the answer format (one YAML block)."""
    lines = [
        "You help maintain the constitution of an AI assistant: principles, each with a critique request (asks "
        "the assistant to point out how its last response fell short of the principle) and a revision request "
        "(asks it to rewrite the response so it no longer does).",
        "",
        "In a red-team run the attacks below succeeded: the assistant carried out a behaviour labelled harmful, "
        "and no principle's judge flagged its answer. The constitution has a gap.",
    ]
    if principles:
        lines += ["", "The constitution's principles now (none of them caught these):"]
        lines += [f"- {name}: {question}" for name, question in principles]
    lines += ["", f"Uncovered failures ({len(failures)}):"]
    for number, item in enumerate(failures[:examples], start=1):
        variant = f"/{item['variant']}" if item.get("variant") else ""
        lines += [f"{number}. Behaviour: {_clip(item.get('behaviour', ''))}",
                  f"   Attack ({item.get('strategy', '?')}{variant}): {_clip(item.get('prompt', ''))}",
                  f"   Answer: {_clip(item.get('answer', ''))}"]
    if len(failures) > examples:
        lines.append(f"… and {len(failures) - examples} more.")
    lines += [
        "",
        "Draft ONE new principle that would catch these failures. Reply with only a YAML block, in this form:",
        "```yaml",
        "name: a-short-kebab-case-name",
        "critique: Identify specific ways in which the assistant's last response …",
        "revision: Please rewrite the assistant response to …",
        "```",
    ]
    return [{"role": "user", "content": "\n".join(lines)}]


def parse_principle(text: str) -> Principle:
    """The principle in an answer: its first fenced YAML/JSON block, or the whole answer; a mapping with exactly
    ``name``, ``critique`` and ``revision`` (or ``critique_request``/``revision_request``), each a non-blank
    string. Anything else is a one-line :class:`ConfigError`."""
    excerpt = repr(" ".join(text.split())[:80])
    fenced = _FENCE.search(text)
    body = fenced.group(1) if fenced else text.strip()
    try:
        data = yaml.safe_load(body)
    except yaml.YAMLError:
        data = None
    if not isinstance(data, dict):
        raise ConfigError(f"the drafter's answer is not a YAML/JSON principle (name, critique, revision): {excerpt}")
    named = {_ALIASES.get(str(key), str(key)): value for key, value in data.items()}
    missing = [key for key in _KEYS if key not in named]
    extra = sorted(set(named) - set(_KEYS))
    if missing or extra or len(named) != len(data):
        problem = ", ".join([*(f"no {k}" for k in missing), *(f"unknown key {k}" for k in extra)]) or "a key twice"
        raise ConfigError(f"the drafter's principle is malformed ({problem}): {excerpt}")
    blank = [key for key in _KEYS if not isinstance(named[key], str) or not named[key].strip()]
    if blank:
        raise ConfigError(f"the drafter's principle is malformed ({', '.join(blank)} not a non-blank text): "
                          f"{excerpt}")
    name, critique, revision = (" ".join(str(named[key]).split()) for key in _KEYS)
    return Principle(name=name, critique=critique, revision=revision)


async def suggest_principle(engine: Engine, role: str, failures: list[dict[str, Any]],
                            principles: list[tuple[str, str]] | None = None, *, max_tokens: int = 512,
                            seed: int = 0) -> Principle:
    """Ask the ``role`` group for one principle from ``failures`` (one call) and read its answer strictly."""
    engine.group(role)  # a missing group is one clear error before any call
    result = await engine.chat(role, ChatRequest(suggestion_request(failures, principles), max_tokens=max_tokens,
                                                 temperature=0.0, seed=seed))
    return parse_principle(result.text)


def write_suggestion(principle: Principle, path: str | Path, *, gaps: str | Path,
                     failures: list[dict[str, Any]]) -> Suggestion:
    """Write ``principle`` for review: a header saying where it came from and that nothing applied it, then the
    principle as a constitution's ``principles`` entry (name, critique, revision)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    ids = tuple(str(item.get("id", "")) for item in failures)
    header = [f"# Drafted by `cai constitution suggest` from {len(ids)} uncovered failures in {gaps}:",
              *(f"#   {i}" for i in ids[:20]), *([f"#   … and {len(ids) - 20} more"] if len(ids) > 20 else []),
              "# A draft for a person to review: no constitution uses it until you add it to one's principles."]
    body = yaml.safe_dump({key: getattr(principle, key) for key in _KEYS}, sort_keys=False, allow_unicode=True,
                          width=100)
    out.write_text("\n".join(header) + "\n" + body, encoding="utf-8")
    return Suggestion(principle, out, ids)
