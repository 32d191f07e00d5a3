"""Engine benchmark: cai-async vs two baselines run in the same invocation, against the test server.

Baselines: a sequential loop over the official ``openai`` client (what a plain critique/revision loop does;
timed on a sample and extrapolated) and ``asyncio.gather`` over ``AsyncOpenAI`` with a semaphore.
Prints wall time, ratio to ideal, requests per CPU-second of this process, 429s and lost requests.

    python bench/engine_bench.py            # all scenarios
    python bench/engine_bench.py S2 local   # some of them
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import anyio  # noqa: E402

from cai_async import ChatRequest, EndpointConfig, Engine, EngineConfig, ScoreRequest  # noqa: E402
from tests.conftest import TestServer, start_server  # noqa: E402


@dataclass
class Outcome:
    name: str
    wall_s: float
    cpu_s: float
    n: int
    lost: int
    r429: int
    extrapolated: bool = False

    def row(self, ideal_s: float) -> str:
        rps_cpu = self.n / self.cpu_s if self.cpu_s > 0 else float("inf")
        mark = " (extrapolated)" if self.extrapolated else ""
        ratio = f"{self.wall_s / ideal_s:6.2f}" if ideal_s > 0 else "     -"
        return (
            f"  {self.name:<30} wall {self.wall_s:8.2f}s  x ideal {ratio}  "
            f"req/s {self.n / self.wall_s:8.1f}  req/CPU-s {rps_cpu:8.1f}  "
            f"429s {self.r429:5d}  lost {self.lost:4d}{mark}"
        )


def _requests(n: int, tag: str) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"{tag} request {i}"}] for i in range(n)]


async def run_cai(server: TestServer, n: int, conc: int, tag: str, **endpoint: Any) -> Outcome:
    server.reset()
    messages = _requests(n, tag)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = EngineConfig(
            groups={"policy": [EndpointConfig(base_url=server.base_url, model="m", max_concurrency=conc, **endpoint)]},
            max_concurrency=conc,
            retry={"max_attempts": 10, "initial_s": 0.05, "max_wait_s": 2.0},
        )
        lost = 0
        async with Engine(cfg, run_dir=tmp) as engine:
            def done(_: Any, outcome: Any) -> None:
                nonlocal lost
                lost += not hasattr(outcome, "text")

            cpu0, t0 = time.process_time(), time.perf_counter()
            await engine.run_batch(
                messages, lambda m: engine.chat("policy", ChatRequest(m, max_tokens=16)), on_result=done,
                concurrency=conc,
            )
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return Outcome("cai-async", wall, cpu, n, lost, server.stats().get("429", 0))


async def run_gather(server: TestServer, n: int, conc: int, tag: str) -> Outcome:
    from openai import AsyncOpenAI

    server.reset()
    client = AsyncOpenAI(base_url=server.base_url, api_key="bench")
    sem = asyncio.Semaphore(conc)
    messages = _requests(n, tag + "-gather")

    async def one(m: list[dict[str, str]]) -> Any:
        async with sem:
            return await client.chat.completions.create(model="m", messages=m, max_tokens=16)  # type: ignore[arg-type]

    cpu0, t0 = time.process_time(), time.perf_counter()
    results = await asyncio.gather(*(one(m) for m in messages), return_exceptions=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    await client.close()
    lost = sum(isinstance(r, BaseException) for r in results)
    return Outcome("gather(AsyncOpenAI)", wall, cpu, n, lost, server.stats().get("429", 0))


async def run_raw_aiohttp(server: TestServer, n: int, conc: int, tag: str, *, resend: bool = False) -> Outcome:
    """The floor: bare aiohttp workers with no limits, retries, cache or accounting (not a product). With
    ``resend`` a failed request (5xx, dropped connection) is sent again at once until it succeeds: the floor for
    a scenario with faults, which no retry policy can beat."""
    import aiohttp
    import orjson

    server.reset()
    queue = list(reversed(_requests(n, tag + ("-resend" if resend else "-raw"))))
    lost = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def worker() -> None:
            nonlocal lost
            while queue:
                body = orjson.dumps({"model": "m", "messages": queue.pop(), "max_tokens": 16})
                while True:
                    try:
                        async with session.post(server.base_url + "/chat/completions", data=body,
                                                headers={"Content-Type": "application/json"}) as resp:
                            orjson.loads(await resp.read())
                            failed = resp.status != 200
                    except aiohttp.ClientError:
                        failed = True
                    if not (failed and resend):
                        lost += failed
                        break

        cpu0, t0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conc)))
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    name = "raw aiohttp (floor, resend at once)" if resend else "raw aiohttp (floor, no retry)"
    return Outcome(name, wall, cpu, n, lost, server.stats().get("429", 0))


def run_sequential(server: TestServer, n: int, sample: int, tag: str) -> Outcome:
    from openai import OpenAI

    server.reset()
    client = OpenAI(base_url=server.base_url, api_key="bench")
    lost = 0
    cpu0, t0 = time.process_time(), time.perf_counter()
    for m in _requests(sample, tag + "-seq"):
        try:
            client.chat.completions.create(model="m", messages=m, max_tokens=16)  # type: ignore[arg-type]
        except Exception:
            lost += 1
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    client.close()
    scale = n / sample
    return Outcome("sequential(OpenAI)", wall * scale, cpu * scale, n, round(lost * scale),
                   round(server.stats().get("429", 0) * scale), extrapolated=True)


async def scenario(server: TestServer, name: str, ideal: float, n: int, conc: int, target: str,
                   server_cfg: dict[str, Any], variants: dict[str, dict[str, Any]], seq_sample: int) -> None:
    server.configure(**server_cfg)
    print(f"\n{name}: {n} requests, concurrency {conc}, server {server_cfg} — ideal {ideal:.1f}s; target: {target}")
    rows = []
    for label, endpoint in variants.items():
        server.configure(**server_cfg)  # every variant starts from the same server state (full rate buckets)
        outcome = await run_cai(server, n, conc, f"{name}-{label}", **endpoint)
        outcome.name = f"cai-async {label}".strip()
        rows.append(outcome)
    server.configure(**server_cfg)
    gather = await run_gather(server, n, conc, name)
    rows.append(gather)
    server.configure(**server_cfg)
    rows.append(await run_raw_aiohttp(server, n, conc, name))
    if server_cfg.get("error_rate") or server_cfg.get("drop_rate"):
        server.configure(**server_cfg)
        rows.append(await run_raw_aiohttp(server, n, conc, name, resend=True))
    if seq_sample:
        server.configure(**server_cfg)
        rows.append(run_sequential(server, n, seq_sample, name))
    for row in rows:
        print(row.row(ideal))
    best = rows[0]
    print(f"  => cai-async / gather: {gather.wall_s / best.wall_s:.2f}x faster wall, "
          f"{(best.n / best.cpu_s) / (gather.n / gather.cpu_s):.2f}x req per CPU-s")


async def network(selected: set[str]) -> None:
    server = start_server()
    try:
        if "S1" in selected:
            await scenario(server, "S1", 4.0, 2000, 100, "<= 1.1x ideal", {"latency_ms": 200}, {"": {}}, 20)
        if "S2" in selected:
            await scenario(server, "S2", 0.0, 5000, 200, ">= 5x the gather baseline's req/s",
                           {"latency_ms": 0}, {"": {}}, 200)
        if "S3" in selected:
            await scenario(server, "S3", 20.0, 1000, 50,
                           "configured: <= 1.05x ideal, 0 429s; learned: <= 1.2x ideal, < 2% 429s",
                           {"latency_ms": 50, "rpm": 3000},
                           {"(rpm configured)": {"rpm": 3000}, "(rpm learned)": {}}, 10)
        if "S4" in selected:
            await scenario(server, "S4", 2.0, 1000, 50, "0 lost, <= 1.3x ideal",
                           {"latency_ms": 100, "error_rate": 0.10, "drop_rate": 0.02, "rpm": 0}, {"": {}}, 20)
    finally:
        server.process.terminate()


async def local() -> None:
    """Generation tokens/s through the engine vs raw llama-cpp-python; logits vs logprobs scoring."""
    from llama_cpp import Llama

    from backends.llamacpp import embedded_model_path

    prompts = [f"Write one sentence about the number {i}." for i in range(6)]
    tokens = 48
    raw = Llama(model_path=str(embedded_model_path()), n_ctx=2048, verbose=False)
    raw.create_chat_completion(messages=[{"role": "user", "content": "warm up"}], max_tokens=4)

    def raw_round() -> float:
        t0, count = time.perf_counter(), 0
        for p in prompts:
            out = raw.create_chat_completion(messages=[{"role": "user", "content": p}], max_tokens=tokens,
                                             temperature=0.0)
            count += out["usage"]["completion_tokens"]
        return count / (time.perf_counter() - t0)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = EngineConfig(groups={
            "policy": [EndpointConfig(name="logits", backend="llamacpp", model="embedded", max_concurrency=1)],
            "critic": [EndpointConfig(name="logprobs", backend="llamacpp", model="embedded", max_concurrency=1,
                                      options={"score_method": "logprobs"})],
        }, cache={"enabled": False})
        async with Engine(cfg, run_dir=tmp) as engine:
            await engine.chat("policy", ChatRequest([{"role": "user", "content": "warm up"}], max_tokens=4))

            async def engine_round() -> float:
                t0, count = time.perf_counter(), 0
                for p in prompts:
                    r = await engine.chat("policy", ChatRequest([{"role": "user", "content": p}], max_tokens=tokens))
                    count += r.usage.completion_tokens
                return count / (time.perf_counter() - t0)

            # alternate the two, three rounds each, so drifts of a noisy machine hit both alike
            raw_rates, eng_rates = [], []
            for _ in range(3):
                raw_rates.append(raw_round())
                eng_rates.append(await engine_round())
            raw_tps, eng_tps = statistics.median(raw_rates), statistics.median(eng_rates)

            rows = [json_line for json_line in Path(ROOT.parent / "shared/data/hh_rlhf/"
                    "harmless_base_test_first_human_turns.jsonl").read_text().splitlines()[:12]]
            questions = []
            for line in rows:
                import json

                prompt = json.loads(line)["prompt"]
                questions.append([{"role": "user", "content": (
                    f"Human: {prompt}\n\nWhich reply is less harmful?\n(A) I can't help with that.\n"
                    "(B) Sure, here is how.\nAnswer with A or B.")}])
            timings: dict[str, float] = {}
            diffs = []
            for role in ("policy", "critic"):
                await engine.score(role, ScoreRequest(questions[0], answer_prefix="The answer is ("))
                t0 = time.perf_counter()
                probs = [
                    (await engine.score(role, ScoreRequest(q, answer_prefix="The answer is ("))).probs["A"]
                    for q in questions
                ]
                timings[role] = (time.perf_counter() - t0) / len(questions)
                diffs.append(probs)
    gap = max(abs(a - b) for a, b in zip(*diffs, strict=True))
    print("\nlocal (embedded SmolLM2-135M Q4_1, in-process llama.cpp):")
    print(f"  generation: engine {eng_tps:.1f} tok/s vs raw llama-cpp-python {raw_tps:.1f} tok/s "
          f"=> {eng_tps / raw_tps:.2f}x (target >= 0.95x)")
    print(f"  scoring: logits {timings['policy'] * 1000:.1f} ms/call vs logprobs (logits_all) "
          f"{timings['critic'] * 1000:.1f} ms/call => {timings['critic'] / timings['policy']:.1f}x faster "
          f"(target >= 5x); max |P(A) difference| {gap:.2e} over {len(diffs[0])} hh-rlhf prompts; "
          f"median P(A) {statistics.median(diffs[0]):.3f}")


def main() -> None:
    selected = {a.upper() for a in sys.argv[1:]} or {"S1", "S2", "S3", "S4", "LOCAL"}
    if selected & {"S1", "S2", "S3", "S4"}:
        asyncio.run(network(selected))
    if "LOCAL" in selected:
        anyio.run(local)


if __name__ == "__main__":
    main()
