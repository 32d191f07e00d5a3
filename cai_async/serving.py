"""What the HTTP servers (``cai guard serve``, ``cai reward serve``) share: an event loop that costs little per
request, and a clean stop on SIGTERM or SIGINT."""

from __future__ import annotations

import importlib.util
import os
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

__all__ = ["run_server", "server_loop", "stop_on_signal"]


def server_loop() -> str:
    """``"uvloop"`` where it is installed (Linux, macOS: a dependency there), else ``"asyncio"``;
    ``CAI_SERVER_LOOP=asyncio`` chooses asyncio's own loop."""
    if os.environ.get("CAI_SERVER_LOOP", "").lower() == "asyncio":
        return "asyncio"
    return "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"


def run_server(main: Callable[[], Awaitable[Any]]) -> Any:
    """Run a server's ``main`` on uvloop where it is installed: the proxy's per-request cost is the event loop's
    and aiohttp's (bench/guard_bench.py measures it), and uvloop's loop is the cheaper one."""
    return anyio.run(main, backend_options={"use_uvloop": server_loop() == "uvloop"})


async def stop_on_signal(scope: anyio.CancelScope) -> None:
    """Cancel ``scope`` on the first SIGTERM or SIGINT, so the server's ``finally`` runs (buffered rows are
    written, the listening socket is closed)."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            scope.cancel()
            return
