"""Load and save constitutions: our YAML/JSON/TOML layout, the two public CAI layouts, and the built-ins."""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from backends.errors import ConfigError
from cai_async.configio import kind_of, read_document, read_mapping, validate, yaml_load
from cai_async.constitution import ComparisonSet, Constitution

__all__ = [
    "builtin_comparison_sets",
    "builtin_constitutions",
    "constitution_from_mapping",
    "load_comparison_set",
    "load_constitution",
    "save_constitution",
]

_BUILTIN_DIR = "data/constitutions"
_COMPARISON_DIR = "data/comparisons"
_KEYS = ("prompt", "response", "critique_request", "critique", "revision_request", "revision")


def _builtins(folder_name: str) -> list[str]:
    folder = resources.files("cai_async").joinpath(folder_name)
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def _builtin_mapping(folder_name: str, name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml_load(
        resources.files("cai_async").joinpath(f"{folder_name}/{name}.yaml").read_text("utf-8")
    )
    return data


def builtin_constitutions() -> list[str]:
    """Names of the constitutions shipped with cai-async."""
    return _builtins(_BUILTIN_DIR)


def builtin_comparison_sets() -> list[str]:
    """Names of the comparison-principle sets shipped with cai-async."""
    return _builtins(_COMPARISON_DIR)


def load_comparison_set(source: str | Path | ComparisonSet) -> ComparisonSet:
    """Comparison principles: a built-in by name (``harmless``, ``helpful-harmless``) or a YAML/JSON/TOML file
    with ``principles: [{name, question, weight}]``."""
    if isinstance(source, ComparisonSet):
        return source
    text = str(source)
    if text in builtin_comparison_sets():
        data, label = _builtin_mapping(_COMPARISON_DIR, text), text
    else:
        if not Path(text).exists():
            raise ConfigError(f"{text}: no such comparison-principle file or built-in "
                              f"(built-ins: {', '.join(builtin_comparison_sets())})")
        data, label = read_mapping(text), text
    if not data.get("principles"):
        raise ConfigError(f"{label}: principles: a comparison set needs at least one principle")
    data.setdefault("name", Path(text).stem)
    return validate(ComparisonSet, data, source=label)


def _expect_text(value: Any, where: str) -> None:
    """A public layout's text field must be text: a list or mapping there is a layout mistake, not a request."""
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected text (a string), not {kind_of(value)}")


def _few_shot_from_chats(chats: Any, source: str) -> list[dict[str, Any]]:
    """``system_chat`` few-shot chats as few-shot examples: alternating user/assistant turns ending with
    prompt, response, critique request, critique, revision request, revision; earlier turns are context."""
    if not isinstance(chats, list):
        raise ConfigError(f"{source}: system_chat must be a list of chats")
    examples: list[dict[str, Any]] = []
    for index, chat in enumerate(chats):
        ok = isinstance(chat, list) and len(chat) >= 6 and len(chat) % 2 == 0
        ok = ok and all(
            isinstance(m, dict) and m.get("role") == ("user", "assistant")[i % 2] and isinstance(m.get("content"), str)
            for i, m in enumerate(chat)
        )
        if not ok:
            raise ConfigError(
                f"{source}: system_chat.{index}: expected alternating user/assistant turns ending with prompt, "
                "response, critique request, critique, revision request, revision"
            )
        example: dict[str, Any] = {key: m["content"] for key, m in zip(_KEYS, chat[-6:], strict=True)}
        example["context"] = [{"role": m["role"], "content": m["content"]} for m in chat[:-6]]
        examples.append(example)
    return examples


def _from_list_layout(data: Mapping[str, Any], name: str, source: str) -> dict[str, Any]:
    """``{"constitutions": [{"critic", "revision"}], "system_chat": [...]}`` (Hugging Face llm-swarm)."""
    items = data["constitutions"]
    if not isinstance(items, list):
        raise ConfigError(f"{source}: constitutions must be a list of {{critic, revision}}")
    extra = set(data) - {"constitutions", "system_chat"}
    if extra:
        raise ConfigError(f"{source}: {', '.join(sorted(extra))}: unknown key (check the spelling)")
    principles = []
    for index, item in enumerate(items):
        if not isinstance(item, dict) or set(item) != {"critic", "revision"}:
            raise ConfigError(f"{source}: constitutions.{index}: expected exactly the keys critic and revision")
        for key in ("critic", "revision"):
            _expect_text(item[key], f"{source}: constitutions.{index}.{key}")
        principles.append({"name": f"{name}-{index:02d}", "critique": item["critic"], "revision": item["revision"]})
    return {
        "name": name,
        "principles": principles,
        "few_shot": _few_shot_from_chats(data.get("system_chat", []), source),
    }


_SEED_KEYS = {"principle": "name", "critique_prompt": "critique", "revision_prompt": "revision"}
_SEED_OPTIONAL = ("weight", "priority", "tags")


def _is_seed_item(item: Any) -> bool:
    return isinstance(item, dict) and "critique_prompt" in item


def _from_seed_layout(items: list[Any], name: str, source: str, where: str = "") -> dict[str, Any]:
    """``[{"principle", "critique_prompt", "revision_prompt"}, ...]`` (the seed document's layout; in TOML,
    ``[[principles]]`` tables with those keys). File order is priority order unless ``priority`` is given,
    and every principle is applied in each revision pass (``draw: all``), as the method's loop does."""
    principles = []
    for index, item in enumerate(items):
        at = f"{where}{index}"
        if not isinstance(item, dict):
            raise ConfigError(f"{source}: {at}: expected a mapping with principle, critique_prompt, revision_prompt")
        missing = [key for key in _SEED_KEYS if key not in item]
        unknown = sorted(set(item) - set(_SEED_KEYS) - set(_SEED_OPTIONAL))
        if missing or unknown:
            problems = ([f"missing {', '.join(missing)}"] if missing else []) + (
                [f"unknown key {', '.join(unknown)} (allowed: {', '.join([*_SEED_KEYS, *_SEED_OPTIONAL])})"]
                if unknown else [])
            raise ConfigError(f"{source}: {at}: {'; '.join(problems)}")
        for key in _SEED_KEYS:
            _expect_text(item[key], f"{source}: {at}.{key}")
        principle = {ours: item[theirs] for theirs, ours in _SEED_KEYS.items()}
        principle["priority"] = index
        principle.update({key: item[key] for key in _SEED_OPTIONAL if key in item})
        principles.append(principle)
    return {"name": name, "draw": "all", "principles": principles}


def _from_dict_layout(data: Mapping[str, Any], name: str, source: str) -> dict[str, Any]:
    """``{"harmful0": {"prompt": [critique], "edit_request": revision}, ...}`` (the paper's layout)."""
    principles = []
    for key, item in data.items():
        if set(item) - {"prompt", "edit_request"}:
            raise ConfigError(f"{source}: {key}: unknown keys {sorted(set(item) - {'prompt', 'edit_request'})}")
        prompt = item.get("prompt")
        if not (isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str)):
            raise ConfigError(
                f"{source}: {key}.prompt: expected a list holding one critique request, like "
                f'["Identify ways the response is harmful."], not {kind_of(prompt)}'
            )
        _expect_text(item.get("edit_request"), f"{source}: {key}.edit_request")
        principles.append({"name": key, "critique": prompt[0], "revision": item["edit_request"]})
    return {"name": name, "principles": principles}


def constitution_from_mapping(
    data: Mapping[str, Any] | list[Any], *, name: str = "constitution", source: str = ""
) -> Constitution:
    """A constitution from parsed data in any supported layout; errors name ``source`` and the key."""
    source = source or name
    if isinstance(data, list):
        payload = _from_seed_layout(data, name, source)
    elif not isinstance(data, Mapping):
        raise ConfigError(f"{source}: not a constitution: expected a mapping or a list of principles")
    elif isinstance(data.get("principles"), list) and any(_is_seed_item(p) for p in data["principles"]):
        extra = set(data) - {"principles", "name", "description", "version", "draw"}
        if extra:
            raise ConfigError(f"{source}: {', '.join(sorted(extra))}: unknown key (check the spelling)")
        payload = {**_from_seed_layout(data["principles"], name, source, "principles."),
                   **{k: v for k, v in data.items() if k != "principles"}}
    elif "principles" in data or not data:
        payload = dict(data)
        payload.setdefault("name", name)
    elif "constitutions" in data:
        payload = _from_list_layout(data, name, source)
    elif all(isinstance(v, dict) and "edit_request" in v for v in data.values()):
        payload = _from_dict_layout(data, name, source)
    else:
        raise ConfigError(
            f"{source}: not a constitution: expected 'principles' (cai-async layout), 'constitutions' (list "
            "layout with critic/revision) or {name: {prompt, edit_request}} (dict layout)"
        )
    if not payload.get("principles"):
        raise ConfigError(f"{source}: principles: a constitution needs at least one principle")
    return validate(Constitution, payload, source=source)


def load_constitution(source: str | Path | Constitution) -> Constitution:
    """A built-in by name (``seed``, ``harmless``…) or a YAML/JSON/TOML file in any supported layout."""
    if isinstance(source, Constitution):
        return source
    text = str(source)
    if text in builtin_constitutions():
        return constitution_from_mapping(_builtin_mapping(_BUILTIN_DIR, text), name=text, source=text)
    path = Path(text)
    if not path.exists():
        raise ConfigError(
            f"{text}: no such constitution file or built-in (built-ins: {', '.join(builtin_constitutions())})"
        )
    data = read_document(path)
    return constitution_from_mapping(data if data is not None else {}, name=path.stem, source=str(path))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value), ensure_ascii=False)  # JSON string escapes are valid TOML basic strings


def _to_toml(data: Mapping[str, Any]) -> str:
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, list | tuple) or not v
             or not isinstance(v[0], dict)]
    for key, value in data.items():
        if isinstance(value, list | tuple) and value and isinstance(value[0], dict):
            for table in value:
                lines += ["", f"[[{key}]]", *(f"{k} = {_toml_value(v)}" for k, v in table.items())]
    return "\n".join(lines) + "\n"


def save_constitution(constitution: Constitution, path: str | Path) -> Path:
    """Write ``constitution`` as YAML, JSON or TOML (by the file's suffix)."""
    target = Path(path)
    data = constitution.model_dump(mode="json", exclude_none=True)  # TOML has no null
    if target.suffix == ".json":
        text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    elif target.suffix == ".toml":
        text = _to_toml(data)
    elif target.suffix in (".yaml", ".yml"):
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=110)
    else:
        raise ConfigError(f"{target}: save as .yaml, .json or .toml")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    return target
