"""What the HTTP servers (``cai guard serve``, ``cai reward serve``) share: a clean stop on SIGTERM or SIGINT."""

from __future__ import annotations

import signal

import anyio

__all__ = ["stop_on_signal"]


async def stop_on_signal(scope: anyio.CancelScope) -> None:
    """Cancel ``scope`` on the first SIGTERM or SIGINT, so the server's ``finally`` runs (buffered rows are
    written, the listening socket is closed)."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            scope.cancel()
            return
