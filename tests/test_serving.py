"""The HTTP servers' event loop: uvloop where installed (a dependency on Linux and macOS), asyncio's own loop on
request."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest

from cai_async.serving import run_server, server_loop


async def loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_servers_run_on_uvloop_where_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CAI_SERVER_LOOP", raising=False)
    installed = importlib.util.find_spec("uvloop") is not None
    assert server_loop() == ("uvloop" if installed else "asyncio")
    assert run_server(loop_module).startswith("uvloop") == installed


def test_cai_server_loop_asyncio_chooses_the_standard_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAI_SERVER_LOOP", "asyncio")
    assert server_loop() == "asyncio"
    assert run_server(loop_module).startswith("asyncio")
