"""``cai reward serve`` throughput: rewards/s over real HTTP on loopback, the constitutional reward judged by the
test server (a few ms latency, 2 principles a completion), in one invocation:

- batched + both caches: queries sent as OpenRLHF 0.11 sends them (one query a request, many requests in
  flight), gathered into batches by the server, repeats answered from its in-memory cache, and every judgment
  also committed to the engine's SQLite request cache (what makes a restart free);
- batched + memory cache: the same without the engine's cache;
- batched, no cache: both caches off (queries in flight at once are still shared);
- one at a time: one request after another, one query each, no batching, no cache (the baseline).

    python bench/reward_bench.py [--queries 512] [--repeat-share 0.25] [--latency-ms 5] [--in-flight 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cai_async import EngineConfig  # noqa: E402
from cai_async.train.config import RewardServerConfig, TrainConfig  # noqa: E402
from cai_async.train.reward_server import serve_rewards, service_for  # noqa: E402
from tests.conftest import start_server  # noqa: E402


def _queries(n: int, repeat_share: float) -> list[tuple[str, str]]:
    distinct = max(1, round(n * (1 - repeat_share)))
    made = [(f"<|im_start|>user\nQuestion {i}: how do I stay safe online?<|im_end|>\n<|im_start|>assistant\n",
             f"Answer {i}: use strong passwords and keep software updated.<|im_end|>") for i in range(distinct)]
    rng = random.Random(0)
    rows = made + [rng.choice(made) for _ in range(n - distinct)]
    rng.shuffle(rows)
    return rows


async def _measure(base_url: str, rows: list[tuple[str, str]], folder: Path, *, batched: bool, cached: bool,
                   engine_cache: bool, in_flight: int) -> tuple[float, dict[str, int]]:
    import aiohttp

    engine = EngineConfig.model_validate({
        "groups": {"critic": [{"backend": "openai", "model": "m", "base_url": base_url}]}, "progress": "off",
        "max_concurrency": 256, "cache": {"enabled": engine_cache}})
    server = RewardServerConfig(port=0, max_batch=64 if batched else 1, cache_size=100_000 if cached else 0,
                                batch_wait_ms=5.0 if batched else 0.0)
    service = await service_for(TrainConfig(rl_ensemble=2, reward_server=server), folder, engine)
    stop, ready, port, wall = anyio.Event(), anyio.Event(), [0], [0.0]

    def bound(number: int) -> None:
        port[0] = number
        ready.set()

    async def client() -> None:
        await ready.wait()
        url = f"http://127.0.0.1:{port[0]}/get_reward"
        try:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
                async def post(prompt: str, response: str) -> Any:
                    async with session.post(url, json={"query": [prompt + response], "prompts": [prompt],
                                                       "labels": [""]}) as answer:
                        return (await answer.json())["rewards"]

                for i in range(8):  # warm-up, not measured: connections, the engine, the cache file
                    await post(f"<|im_start|>user\nwarm-up {i}<|im_end|>\n<|im_start|>assistant\n", "ok")
                start = time.perf_counter()
                if batched:
                    gate = anyio.Semaphore(in_flight)

                    async def one(row: tuple[str, str]) -> None:
                        async with gate:
                            await post(*row)

                    async with anyio.create_task_group() as tg:
                        for row in rows:
                            tg.start_soon(one, row)
                else:
                    for row in rows:
                        await post(*row)
                wall[0] = time.perf_counter() - start
        finally:
            stop.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(client)
        await serve_rewards(service, on_ready=bound, stop=stop, signals=False)
    return wall[0], dict(service.stats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=512)
    parser.add_argument("--repeat-share", type=float, default=0.25)
    parser.add_argument("--latency-ms", type=float, default=5.0)
    parser.add_argument("--in-flight", type=int, default=64, help="Requests in flight (OpenRLHF: rollouts).")
    parser.add_argument("--rounds", type=int, default=2, help="Rounds over the modes (best kept).")
    args = parser.parse_args()
    judge = start_server()
    judge.configure(latency_ms=args.latency_ms, prefer="A")
    rows = _queries(args.queries, args.repeat_share)
    judge.reset()
    print(f"cai reward serve: {args.queries} queries ({args.repeat_share:.0%} repeats), one query a request, "
          f"constitutional reward (2 principles a completion) judged by the test server at {args.latency_ms:g} ms")
    results = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            modes = (("batched + both caches", True, True, True), ("batched + memory cache", True, True, False),
                     ("batched, no cache", True, False, False), ("one at a time", False, False, False))
            for round_ in range(args.rounds):  # modes alternate; the best round of each is kept
                for label, batched, cached, on_disk in modes if round_ % 2 == 0 else modes[::-1]:
                    folder = Path(tmp) / f"{label.replace(' ', '_')}-{round_}"
                    wall, stats = anyio.run(lambda b=batched, c=cached, d=on_disk, f=folder: _measure(
                        judge.base_url, rows, f, batched=b, cached=c, engine_cache=d, in_flight=args.in_flight))
                    results[label] = max(results.get(label, 0.0), args.queries / wall)
                    print(f"  {label:<22} {wall:7.2f} s  {args.queries / wall:8.1f} rewards/s  judge calls "
                          f"{judge.stats()['ok'] - 16:>5}  batches {stats['batches'] - 8:>4}  cache hits "
                          f"{stats['cache_hits']}", flush=True)
                    judge.reset()
        base = results["one at a time"]
        print("  best of each, vs one at a time: " + ", ".join(
            f"{label} {rate / base:.1f}x" for label, rate in results.items() if label != "one at a time"))
    finally:
        judge.process.terminate()


if __name__ == "__main__":
    main()
