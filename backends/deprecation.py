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
key there was set by an override (the config itself holds only new keys), so it wins over the new one."""


def renamed_keys(data: Any, names: Mapping[str, str], *, where: str, context: Any = None) -> Any:
    """``data`` (a mapping about to be validated; anything else is returned as it is) with each old key of
    ``names`` (old → new) moved to its new key, said once by :func:`renamed`. Both names given is a ValueError
    naming both, so validation reports it on the key's path, unless the validation ``context`` carries
    :data:`OVERRIDES` (then the old key, an override's, wins)."""
    if not isinstance(data, Mapping) or not any(old in data for old in names):
        return data
    moved = dict(data)
    for old, new in names.items():
        if old not in moved:
            continue
        if new in moved and not (isinstance(context, Mapping) and context.get(OVERRIDES)):
            raise ValueError(f"{old} and {new} are both given; keep {new} ({old} is its old name)")
        renamed(old, new, where=where)
        moved[new] = moved.pop(old)
    return moved
