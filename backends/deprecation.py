"""Old names that still work: one line, once per process, saying what the name is now."""

from __future__ import annotations

import logging

__all__ = ["renamed"]

_log = logging.getLogger("backends.deprecation")
_said: set[tuple[str, str, str]] = set()


def renamed(old: str, new: str, *, where: str) -> None:
    """Say once that ``old`` (in ``where``: a recipe key, a group, a value) is now called ``new``."""
    if (old, new, where) in _said:
        return
    _said.add((old, new, where))
    _log.warning("%s: %r is now called %r; the old name still works (rename it to silence this line)",
                 where, old, new)
