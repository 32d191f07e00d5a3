"""Shared fixtures: the OpenAI-compatible test server (a real HTTP server on 127.0.0.1, in a subprocess)."""

from __future__ import annotations

import ast
import json
import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REQUIRE_ALL = os.environ.get("CAI_REQUIRE_ALL") == "1"
"""Set by ``.ci/run``: a test skipped for a missing part (chromium, datasets, llama.cpp, libyaml, a git checkout)
fails instead, so CI cannot turn green without it. A skip marked ``allowed`` (a test for the other case) stays."""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if REQUIRE_ALL and report.skipped and item.get_closest_marker("allowed_skip") is None:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped where CAI_REQUIRE_ALL=1 asks for every part: {reason}"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "allowed_skip: a skip that is no missing part (CAI_REQUIRE_ALL keeps it)")


ROOT = Path(__file__).resolve().parent.parent
PUBLIC_DATA = ROOT / "cai_async" / "data" / "public"
"""The public data slices bundled with the package (the only data the tests read)."""


class TestServer:
    """Handle on a running ``tests.server`` process."""

    __test__ = False

    def __init__(self, process: subprocess.Popen[str], port: int) -> None:
        self.process = process
        self.port = port
        self.root = f"http://127.0.0.1:{port}"
        self.base_url = f"{self.root}/v1"

    def _post(self, path: str, data: dict[str, Any]) -> Any:
        req = urllib.request.Request(
            self.root + path, data=json.dumps(data).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def configure(self, **changes: Any) -> Any:
        return self._post("/config", changes)

    def reset(self) -> None:
        self._post("/reset", {})

    def requests(self) -> list[list[dict[str, str]]]:
        """Messages of every request since the last reset (needs ``configure(record=True)``)."""
        with urllib.request.urlopen(self.root + "/requests", timeout=10) as resp:
            data: list[list[dict[str, str]]] = json.loads(resp.read())
            return data

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.root + "/stats", timeout=10) as resp:
            data: dict[str, Any] = json.loads(resp.read())
            return data


def start_server(*args: str) -> TestServer:
    """Start ``python -m tests.server`` and wait for its port."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.server", "--port", "0", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("PORT "):
        process.kill()
        raise RuntimeError(f"test server did not start: {line!r}")
    return TestServer(process, int(line.split()[1]))


_DEFAULTS = {
    "latency_ms": 0.0, "rpm": 0, "tpm": 0, "send_rate_headers": True, "error_rate": 0.0,
    "drop_rate": 0.0, "api_key": "", "prefer": "", "seed": 0, "record": False, "reply": "",
    "prefer_when": {}, "stream_chunk_ms": 0.0, "fail_status": 0, "retry_after_s": 0.0, "trickle_s": 0.0,
    "html": False, "truncate": False, "bad_utf8": False, "nochoices": False, "logprobs": True, "dead": False,
    "batches": True, "batch_validating_s": 0.05,
    "batch_progress_s": 0.2,
    "batch_finalizing_s": 0.05, "batch_outcome": "completed", "batch_expire_fraction": 0.5,
    "batch_error_rate": 0.0, "batch_drop_ids": 0, "batch_unknown_ids": 0, "batch_max_requests": 50_000,
    "replies": [], "choices": [], "tool_calls": [], "echo_auth": False, "answer_json": None, "bad_stream_line": False,
    "hold_after": 0,
}


@pytest.fixture(scope="session")
def _server_process() -> Iterator[TestServer]:
    server = start_server()
    yield server
    server.process.terminate()
    server.process.wait(timeout=10)


@pytest.fixture
def server(_server_process: TestServer) -> TestServer:
    """The shared test server, reset to default behaviour and empty statistics."""
    _server_process.configure(**_DEFAULTS)
    _server_process.reset()
    return _server_process


def kill_repeatedly(args: list[str], delays: tuple[float, ...], server: TestServer, *, step: int = 25) -> int:
    """Run ``args`` once per delay and ``kill -9`` it mid-run at a known point: the server admits ``step`` × that
    delay more calls, then holds every later one (``hold_after``); once the process has a call held it is killed
    (it cannot finish first, however fast or slow the machine), and the hold is lifted (the dead process's held
    calls are dropped unanswered). Returns how many runs were killed: all of them, unless one had less work left
    than its share of calls."""
    import signal
    import time

    kills = 0
    for delay in delays:
        server.configure(hold_after=server.stats().get("admitted", 0) + max(1, round(step * delay)))
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            deadline = time.monotonic() + 120
            while process.poll() is None and server.stats().get("held", 0) == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
                kills += 1
            process.wait()
        finally:
            server.configure(hold_after=0)
            deadline = time.monotonic() + 30  # the dead process's held calls are dropped before the next run starts
            while server.stats().get("held", 0) and time.monotonic() < deadline:
                time.sleep(0.02)
    return kills


def listening_line(stream: Any, *, most: int = 20) -> str:
    """The first line of a server process's ``stream`` that says where it listens (``listening on URL``); lines
    before it (a warning, a renamed-setting notice) are skipped. Fails with what was read when none comes."""
    seen: list[str] = []
    while len(seen) < most:
        line = stream.readline()
        if not line:  # the process ended
            break
        if "listening on" in line:
            return str(line)
        seen.append(line)
    raise AssertionError("no 'listening on' line; the server said:\n" + "".join(seen))


@pytest.fixture
def free_port() -> int:
    """A loopback port with nothing listening on it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def cli_env() -> dict[str, str]:
    """Environment for running the ``cai`` CLI in a subprocess."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def anyio_backend() -> str:
    """aiohttp needs asyncio."""
    return "asyncio"


def module_imports(path: Path) -> set[str]:
    """The modules a Python file imports (``from X import …`` and ``import X``), read with ``ast``."""
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
    return modules


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Derived model files (the F16 copy of the embedded GGUF: about a second to make) go to a folder of this
    session's own, for in-process backends and the ``cai`` subprocesses alike, never to ``~/.cache/cai-async``:
    a copy left there by an older build or another checkout cannot stand in for the one these tests make."""
    folder = tmp_path_factory.mktemp("cai-cache")
    saved = os.environ.get("CAI_CACHE_DIR")
    os.environ["CAI_CACHE_DIR"] = str(folder)
    yield folder
    if saved is None:
        os.environ.pop("CAI_CACHE_DIR", None)
    else:
        os.environ["CAI_CACHE_DIR"] = saved
