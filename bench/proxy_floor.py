"""The floor under any Python proxy on this machine, for ``bench/guard_bench.py``: what a proxy that does nothing
adds. ``tcp``: an asyncio byte pipe (one upstream connection per client connection, no HTTP parsing at all);
``aiohttp``: the thinnest aiohttp proxy (read the body, post it upstream on a pooled session, answer with the
upstream's bytes). Prints ``PORT <n>`` when it listens.

    .venv/bin/python bench/proxy_floor.py --mode tcp --upstream http://127.0.0.1:PORT/v1"""

from __future__ import annotations

import argparse
import asyncio
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web


class _Pipe(asyncio.Protocol):
    """One side of a byte pipe: what arrives is written to the peer; pauses when the peer's buffer is full."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Pipe | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)
        else:
            self.pending.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


async def serve_tcp(host: str, port: int) -> asyncio.Server:
    loop = asyncio.get_running_loop()

    class Client(_Pipe):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self.connecting = loop.create_task(self.connect())

        async def connect(self) -> None:
            _, upstream = await loop.create_connection(_Pipe, host, port)
            upstream.peer, self.peer = self, upstream
            assert upstream.transport is not None
            for data in self.pending:
                upstream.transport.write(data)
            self.pending.clear()

    return await loop.create_server(Client, "127.0.0.1", 0, backlog=4096)


async def serve_aiohttp(base_url: str) -> web.ServerRunner:
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def relay(request: web.BaseRequest) -> web.Response:
        async with session.post(f"{base_url}{request.path[3:]}", data=await request.read(),
                                headers={"Content-Type": "application/json"}) as answer:
            return web.Response(body=await answer.read(), status=answer.status,
                                content_type=answer.content_type)

    runner = web.ServerRunner(web.Server(relay), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, backlog=4096).start()
    return runner


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("tcp", "aiohttp"), required=True)
    parser.add_argument("--upstream", required=True, help="the upstream's base URL (…/v1)")
    args = parser.parse_args()
    if args.mode == "tcp":
        parts = urlsplit(args.upstream)
        server = await serve_tcp(parts.hostname or "127.0.0.1", parts.port or 80)
        port = server.sockets[0].getsockname()[1]
    else:
        runner = await serve_aiohttp(args.upstream.rstrip("/"))
        port = runner.addresses[0][1]
    print(f"PORT {port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
