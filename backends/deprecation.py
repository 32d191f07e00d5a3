"""Old names that still work: one line, once per process, saying what the name is now."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

__all__ = ["OVERRIDES", "renamed", "renamed_keys"]

_log = logging.getLogger("backends.deprecation")
_said: set[tuple[str, str, str]] = set()


def renamed(old: str, new: str, *, where: str) -> None:
    """Say once that ``old`` (in ``where``: a recipe key, a group, a value) is now called ``new``."""
    if (old, new, where) in _said:
        return
    _said.add((old, new, where))
    _log.warning("%s: %r is now called %r; the old name still works (rename it to silence this line)",
                 where, old, new)


OVERRIDES = "overrides"
"""The validation context key that marks data with command-line overrides laid over a validated config: an old
key there was set by an override (the config itself holds only new keys), so it is laid over the new one."""


def renamed_keys(data: Any, names: Mapping[str, str], *, where: str, context: Any = None) -> Any:
    """``data`` (a mapping about to be validated; anything else is returned as it is) with each old key of
    ``names`` (old → new) moved to its new key, said once by :func:`renamed`. Both names given (the new one not
    null) is a ValueError naming both, so validation reports it on the key's path, unless the validation
    ``context`` carries :data:`OVERRIDES`: then the old key's value, an override's, is laid over the new one's
    (a mapping key by key at every depth, anything else replacing it)."""
    if not isinstance(data, Mapping) or not any(old in data for old in names):
        return data
    overriding = isinstance(context, Mapping) and bool(context.get(OVERRIDES))
    moved = dict(data)
    for old, new in names.items():
        if old not in moved:
            continue
        value = moved.pop(old)
        renamed(old, new, where=where)
        if moved.get(new) is not None:
            if not overriding:
                raise ValueError(f"{old} and {new} are both given; keep {new} ({old} is its old name)")
            value = _laid_over(moved[new], value)
        moved[new] = value
    return moved


def _laid_over(base: Any, over: Any) -> Any:
    """``over`` laid over ``base`` (plain data, as overrides see a config), key by key at every depth."""
    if not isinstance(over, Mapping):
        return over
    merged = dict(base) if isinstance(base, Mapping) else {}
    for key, value in over.items():
        merged[key] = _laid_over(merged.get(key), value)
    return merged
