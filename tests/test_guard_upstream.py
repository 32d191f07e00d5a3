"""The guard proxy's upstream client (``cai_async/guard/upstream.py``) against real loopback servers that answer
the ways real ones do: keep-alive then a dropped idle connection, chunked streams, bodies ended by closing the
connection, silence. (The proxy over it is tested end to end in ``test_guard.py``.)"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from cai_async.guard.upstream import UpstreamClient, UpstreamUnreachable

Answer = Callable[[int], list[bytes]]


async def _serve(answer: Answer, *, close_after: bool = False) -> tuple[asyncio.Server, list[bytes]]:
    """A raw HTTP server: the n-th request on the server gets the byte pieces ``answer(n)`` (written with a short
    pause between them); with ``close_after`` it drops the connection after each answer."""
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                                   if line.lower().startswith(b"content-length:")), b"0"))
                seen.append(head + await reader.readexactly(length))
                for piece in answer(len(seen)):
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.01)
                if close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0), seen


def _url(server: asyncio.Server) -> str:
    return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"


def _json(n: int) -> list[bytes]:
    body = b'{"n": %d}' % n
    return [b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body]


@pytest.mark.anyio
async def test_keep_alive_reuses_one_connection_and_a_dropped_one_is_replaced() -> None:
    server, seen = await _serve(_json)
    client = UpstreamClient(_url(server), timeout_s=5)
    for n in (1, 2):
        async with await client.send("POST", "/chat/completions", body=b"{}",
                                     headers={"Content-Type": "application/json"}) as answer:
            assert (answer.status, await answer.read()) == (200, b'{"n": %d}' % n)
    assert len(client.idle) == 1  # both went over one connection
    assert seen[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:")
    server.close()
    await server.wait_closed()

    dropping, seen = await _serve(_json, close_after=True)  # answers, then closes: the pooled one goes stale
    client = UpstreamClient(_url(dropping), timeout_s=5)
    for n in (1, 2, 3):
        async with await client.send("GET", "/models") as answer:
            assert await answer.read() == b'{"n": %d}' % n
        await asyncio.sleep(0.05)  # the server's close arrives
    assert len(seen) == 3
    client.close()
    dropping.close()


@pytest.mark.anyio
async def test_chunked_streams_line_by_line_and_a_close_ends_an_unsized_body() -> None:
    def stream(n: int) -> list[bytes]:
        events = [b'data: {"i": %d}\n\n' % i for i in range(3)] + [b"data: [DONE]\n\n"]
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        return [head] + [b"%x\r\n%s\r\n" % (len(e), e) for e in events] + [b"0\r\n\r\n"]

    server, _ = await _serve(stream)
    client = UpstreamClient(_url(server), timeout_s=5)
    async with await client.send("POST", "/chat/completions", body=b"{}") as answer:
        assert answer.content_type == "text/event-stream"
        lines = [line async for line in answer.lines() if line.strip()]
    assert lines == [b'data: {"i": 0}\n', b'data: {"i": 1}\n', b'data: {"i": 2}\n', b"data: [DONE]\n"]
    assert len(client.idle) == 1
    server.close()

    unsized, _ = await _serve(lambda n: [b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n", b"all of ", b"it"],
                              close_after=True)
    client = UpstreamClient(_url(unsized), timeout_s=5)
    async with await client.send("GET", "/models") as answer:
        assert await answer.read() == b"all of it"
    assert client.idle == []  # a connection the server closed is not kept
    unsized.close()


@pytest.mark.anyio
async def test_silence_refusal_and_a_cut_answer_each_raise_what_happened() -> None:
    silent, _ = await _serve(lambda n: [b"HTTP/1.1 200 OK\r\n"])  # never finishes its head
    client = UpstreamClient(_url(silent), timeout_s=0.3)
    with pytest.raises(UpstreamUnreachable, match=r"no answer within 0.3 s"):
        await client.send("GET", "/models")
    silent.close()

    cut, _ = await _serve(lambda n: [b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"only part"],
                          close_after=True)
    url = _url(cut)
    client = UpstreamClient(url, timeout_s=5)
    async with await client.send("GET", "/models") as answer:
        with pytest.raises(UpstreamUnreachable, match="before its answer was complete"):
            await answer.read()
    cut.close()
    await cut.wait_closed()

    with pytest.raises(UpstreamUnreachable, match="ConnectionRefusedError"):
        await UpstreamClient(url, timeout_s=5).send("GET", "/models")  # nothing listens there now


def test_a_url_that_is_not_http_is_a_config_error() -> None:
    from backends.errors import ConfigError

    with pytest.raises(ConfigError, match="is not an http:// or https:// URL"):
        UpstreamClient("ftp://example.org/v1", timeout_s=1)
