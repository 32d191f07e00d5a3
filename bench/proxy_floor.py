"""The floor under any Python proxy on this machine, for ``bench/guard_bench.py``: what a proxy that does nothing
adds. ``tcp``: an asyncio byte pipe (one upstream connection per client connection, no HTTP parsing at all);
``aiohttp``: the thinnest aiohttp proxy (read the body, post it upstream on a pooled session, answer with the
upstream's bytes); ``httptools``: the same relay with llhttp parsing on both sides (an asyncio protocol for the
server, the guard's own upstream client, ``cai_async/guard/upstream.py``). Prints ``PORT <n>`` when it listens.

    .venv/bin/python bench/proxy_floor.py --mode tcp --upstream http://127.0.0.1:PORT/v1"""

from __future__ import annotations

import argparse
import asyncio
import gc
from urllib.parse import urlsplit

import aiohttp
import httptools
from aiohttp import web

from cai_async.guard.upstream import UpstreamClient


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


class _Relay(asyncio.Protocol):
    """An HTTP/1.1 server connection that relays each POST's body upstream and answers with the upstream's bytes."""

    def __init__(self, client: UpstreamClient) -> None:
        self.client, self.parser = client, httptools.HttpRequestParser(self)
        self.url, self.body = b"", b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        asyncio.get_running_loop().create_task(self.relay(self.url.decode()[3:], self.body))
        self.url, self.body = b"", b""

    async def relay(self, path: str, body: bytes) -> None:
        async with await self.client.send("POST", path, body=body,
                                          headers={"Content-Type": "application/json"}) as answer:
            data = await answer.read()
        self.transport.write(b"HTTP/1.1 %d OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s" % (
            answer.status, answer.content_type.encode(), len(data), data))


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("tcp", "aiohttp", "httptools"), required=True)
    parser.add_argument("--upstream", required=True, help="the upstream's base URL (…/v1)")
    args = parser.parse_args()
    if args.mode == "tcp":
        parts = urlsplit(args.upstream)
        server = await serve_tcp(parts.hostname or "127.0.0.1", parts.port or 80)
        port = server.sockets[0].getsockname()[1]
    elif args.mode == "httptools":
        client = UpstreamClient(args.upstream, timeout_s=300)
        server = await asyncio.get_running_loop().create_server(lambda: _Relay(client), "127.0.0.1", 0, backlog=4096)
        port = server.sockets[0].getsockname()[1]
    else:
        runner = await serve_aiohttp(args.upstream.rstrip("/"))
        port = runner.addresses[0][1]
    gc.collect()
    gc.freeze()  # as the guard proxy does once it serves (cai_async.serving.freeze_startup_heap)
    print(f"PORT {port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
