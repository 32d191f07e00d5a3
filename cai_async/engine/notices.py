"""Warnings that repeat (an endpoint failing the same way for every call) folded into one line with a count."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Notices"]


@dataclass
class _Seen:
    message: str
    logged_at: float
    folded: int = 0


class Notices:
    """Logs a warning the first time its ``key`` is seen, then at most once every ``every_s`` seconds, saying
    how many like it were folded in meanwhile; :meth:`flush` logs what is still folded (at the end of a run)."""

    def __init__(
        self, logger: logging.Logger, *, every_s: float = 30.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._log = logger
        self._every_s = every_s
        self._clock = clock
        self._seen: dict[str, _Seen] = {}

    def warn(self, key: str, message: str) -> None:
        """Log ``message`` now, or count it under ``key`` when one like it was logged less than ``every_s`` ago."""
        now = self._clock()
        seen = self._seen.get(key)
        if seen is not None and now - seen.logged_at < self._every_s:
            seen.folded += 1
            seen.message = message
            return
        more = f" (and {seen.folded} more like it in {now - seen.logged_at:.0f}s)" if seen and seen.folded else ""
        self._log.warning("%s%s", message, more)
        self._seen[key] = _Seen(message, now)

    def settle(self, key: str) -> None:
        """Forget the repeats counted under ``key`` without a line: a later line says them (an endpoint declared
        down, whose failing probes are no news)."""
        seen = self._seen.get(key)
        if seen is not None:
            seen.folded = 0

    def flush(self) -> None:
        """Log every warning still folded, with its count."""
        for seen in self._seen.values():
            if seen.folded:
                self._log.warning("%s (%d like it in all since the last such line)", seen.message, seen.folded)
                seen.folded = 0
