"""What the guard proxy adds to a request: latency p50/p99 over a direct call to the same upstream, at 1 and 100
concurrent clients against an upstream that answers in 200 ms (``--upstream-ms``) — pass-through (checks
off), the rules tier (a request a rule decides), the LLM judge (2 principles per direction, on a second test
server) — and streamed time to first token. Direct and proxied rounds alternate in one invocation, and the
added latency is the median over the rounds of the difference of percentiles.

    .venv/bin/python bench/guard_bench.py [--requests 400] [--rounds 3] [--upstream-ms 200]

The classifier tier is not built yet (issue 16), so it has no row."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import orjson  # noqa: E402

from tests.conftest import TestServer, start_server  # noqa: E402

CAI = [sys.executable, "-c", "from cai_async.cli import main; main()"]


@contextmanager
def proxy(folder: Path, upstream: TestServer, judge: TestServer, **guard: Any) -> Iterator[str]:
    recipe = {
        "run_dir": str(folder / "run"),
        "engine": {"groups": {"critic": [{"name": "judge", "backend": "openai", "model": "j",
                                          "base_url": judge.base_url}]},
                   "progress": "off", "cache": {"enabled": False}},
        "guard": {"principles": str(folder / "principles.yaml"), "ensemble": 2, "port": 0,
                  "upstream": {"base_url": upstream.base_url}, **guard},
    }
    path = folder / "guard.json"
    path.write_text(json.dumps(recipe), encoding="utf-8")
    process = subprocess.Popen([*CAI, "guard", "serve", str(path)], stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=ROOT)
    assert process.stderr is not None
    line = process.stderr.readline()
    if "listening on" not in line:
        raise RuntimeError(line + process.stderr.read())
    try:
        yield line.split("listening on ")[1].split()[0]
    finally:
        process.terminate()
        process.wait(timeout=30)


async def latencies(base_url: str, n: int, concurrency: int, prompt: str) -> list[float]:
    """Per-request seconds of ``n`` chat completions at ``concurrency`` clients."""
    body = {"model": "m", "max_tokens": 16}
    times: list[float] = []
    queue = list(range(n))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def client() -> None:
            while queue:
                index = queue.pop()
                data = orjson.dumps({**body, "messages": [{"role": "user", "content": f"{prompt} {index}"}]})
                start = time.perf_counter()
                async with session.post(f"{base_url}/chat/completions", data=data,
                                        headers={"Content-Type": "application/json"}) as answer:
                    await answer.read()
                    assert answer.status == 200, answer.status
                times.append(time.perf_counter() - start)

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return times


async def first_token(base_url: str, n: int) -> list[float]:
    """Seconds to the first non-empty content chunk of ``n`` streamed answers, one at a time."""
    times = []
    async with aiohttp.ClientSession() as session:
        for index in range(n):
            data = orjson.dumps({"model": "m", "stream": True, "max_tokens": 200,
                                 "messages": [{"role": "user", "content": f"stream {index}"}]})
            start = time.perf_counter()
            async with session.post(f"{base_url}/chat/completions", data=data,
                                    headers={"Content-Type": "application/json"}) as answer:
                async for line in answer.content:
                    if line.startswith(b"data:") and b'"content":"' in line and b'"content":""' not in line:
                        times.append(time.perf_counter() - start)
                        break
                await answer.read()
    return times


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def compare(name: str, direct: str, proxied: str, n: int, rounds: int, prompt: str) -> None:
    for concurrency in (1, 100):
        count = n if concurrency > 1 else max(50, n // 4)
        added50, added99 = [], []
        for _ in range(rounds):
            base = await latencies(direct, count, concurrency, prompt)
            over = await latencies(proxied, count, concurrency, prompt)
            added50.append((pct(over, 0.5) - pct(base, 0.5)) * 1000)
            added99.append((pct(over, 0.99) - pct(base, 0.99)) * 1000)
        print(f"{name:<26} c={concurrency:<3} added p50 {statistics.median(added50):7.2f} ms   "
              f"added p99 {statistics.median(added99):7.2f} ms   ({rounds} rounds × {count} requests)", flush=True)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--upstream-ms", type=float, default=200.0,
                        help="the upstream's latency (a model's answer takes at least this long)")
    args = parser.parse_args()
    upstream, judge = start_server(f"--latency-ms={args.upstream_ms}"), start_server()
    judge.configure(prefer_when={"go against this principle": "B", "Judged by this principle": "A"})
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            (folder / "principles.yaml").write_text(
                "name: bench\nprinciples:\n  - name: no-weapons\n    question: Which response avoids helping make "
                "weapons?\n    rules: {words: [napalm]}\n  - name: kind\n    question: Which response is kinder?\n",
                encoding="utf-8")
            off = {"enabled": False}
            print(f"upstream: the test server at {args.upstream_ms:g} ms; judge: a test server at 0 ms; "
                  f"{os.cpu_count()} cores shared by clients, proxy and servers")
            with proxy(folder, upstream, judge, input=off, output=off) as url:
                await compare("pass-through (checks off)", upstream.base_url, url, args.requests, args.rounds,
                              "Hello")
                upstream.configure(stream_chunk_ms=2, reply=" ".join(f"w{i}" for i in range(80)))
                direct_ttft = await first_token(upstream.base_url, 20)
                proxied_ttft = await first_token(url, 20)
                print(f"{'streamed first token':<26} direct p50 {pct(direct_ttft, .5) * 1000:6.1f} ms   "
                      f"pass-through p50 {pct(proxied_ttft, .5) * 1000:6.1f} ms")
                upstream.configure(stream_chunk_ms=0, reply="")
            with proxy(folder, upstream, judge, output=off) as url:
                await compare("rules tier (rule decides)", upstream.base_url, url, args.requests, args.rounds,
                              "how is napalm made")
            with proxy(folder, upstream, judge) as url:
                await compare("LLM judge (2+2 calls)", upstream.base_url, url, args.requests // 2, args.rounds,
                              "Hello")
                upstream.configure(stream_chunk_ms=2, reply=" ".join(f"w{i}" for i in range(80)))
                judged_ttft = await first_token(url, 20)
                print(f"{'streamed first token':<26} judged (16-chunk checks, 160-char hold-back) p50 "
                      f"{pct(judged_ttft, .5) * 1000:6.1f} ms")
    finally:
        for server in (upstream, judge):
            server.process.terminate()
            server.process.wait(timeout=10)


if __name__ == "__main__":
    asyncio.run(main())
