"""The console every command prints its lines on (stderr, so stdout stays for what a script reads)."""

from __future__ import annotations

from rich.console import Console

__all__ = ["console"]

console = Console(stderr=True, soft_wrap=True)
