"""SL-CAI benchmark: critique → revision chains through cai-async vs baselines measured in the same run.

Network (against the test server at 200 ms latency): 1,000 prompts × 2 rounds = 5 calls a chain, 100 chains
in flight; ideal = 1000 × 5 × 0.2 s / 100 = 10 s. Baselines: the seed-style sequential loop over the official
``openai`` client (timed on a sample, extrapolated) and ``asyncio.gather`` over ``AsyncOpenAI`` chains.

Local (embedded SmolLM2 in-process): chains one at a time (the default: a chain's steps reuse llama.cpp's KV
cache) vs chains interleaved.

    python bench/sl_bench.py              # both
    python bench/sl_bench.py network      # or: local
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cai_async import Recipe, load_constitution, run_recipe  # noqa: E402
from tests.conftest import TestServer, start_server  # noqa: E402

N, ROUNDS, CONCURRENCY, LATENCY_S = 1000, 2, 100, 0.2
CONSTITUTION = load_constitution("harmless")


def _prompts(folder: Path, n: int) -> Path:
    source = ROOT.parent / "shared" / "data" / "hh_rlhf" / "harmless_base_test_first_human_turns.jsonl"
    lines = source.read_text().splitlines()[:n]
    path = folder / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _chain_messages(prompt: str, response: str, request: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response},
            {"role": "user", "content": request}]


def sequential_chain(client: Any, prompt: str) -> None:
    """The seed-style loop: one call after another."""
    def ask(messages: list[dict[str, str]]) -> str:
        reply = client.chat.completions.create(model="m", messages=messages, max_tokens=64)
        return str(reply.choices[0].message.content)

    response = ask([{"role": "user", "content": prompt}])
    for principle in CONSTITUTION.principles[:ROUNDS]:
        asked = _chain_messages(prompt, response, principle.critique)
        critique = ask(asked)
        response = ask([*asked, {"role": "assistant", "content": critique},
                        {"role": "user", "content": principle.revision}])


async def gather_chains(server: TestServer, prompts: list[str]) -> float:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=8)
    gate = asyncio.Semaphore(CONCURRENCY)

    async def ask(messages: list[dict[str, str]]) -> str:
        reply = await client.chat.completions.create(model="m", messages=messages, max_tokens=64)  # type: ignore[arg-type]
        return str(reply.choices[0].message.content)

    async def chain(prompt: str) -> None:
        async with gate:
            response = await ask([{"role": "user", "content": prompt}])
            for principle in CONSTITUTION.principles[:ROUNDS]:
                asked = _chain_messages(prompt, response, principle.critique)
                critique = await ask(asked)
                response = await ask([*asked, {"role": "assistant", "content": critique},
                                      {"role": "user", "content": principle.revision}])

    start = time.perf_counter()
    await asyncio.gather(*(chain(p) for p in prompts))
    await client.close()
    return time.perf_counter() - start


def network() -> None:
    from openai import OpenAI

    server = start_server()
    try:
        server.configure(latency_ms=LATENCY_S * 1000)
        ideal = N * (1 + 2 * ROUNDS) * LATENCY_S / CONCURRENCY
        with tempfile.TemporaryDirectory() as tmp:
            prompts_file = _prompts(Path(tmp), N)
            prompts = [json.loads(line)["prompt"] for line in prompts_file.read_text().splitlines()]
            recipe = Recipe.model_validate({
                "run_dir": str(Path(tmp) / "run"),
                "engine": {"groups": {"policy": [{"backend": "openai", "model": "m", "base_url": server.base_url}]},
                           "max_concurrency": CONCURRENCY, "progress": "off"},
                "sl": {"input": str(prompts_file), "id_column": "id", "num_revisions": ROUNDS,
                       "constitution": "harmless", "max_tokens": 64, "critique_max_tokens": 64,
                       "revision_max_tokens": 64, "shard_rows": 256},
            })
            server.reset()
            start = time.perf_counter()
            summary = asyncio.run(run_recipe(recipe))
            ours = time.perf_counter() - start
            stats = server.stats()
            stage = summary["stages"]["sl"]
            server.reset()
            gathered = asyncio.run(gather_chains(server, prompts))
            sample = 5
            client = OpenAI(base_url=server.base_url, api_key="x")
            start = time.perf_counter()
            for prompt in prompts[:sample]:
                sequential_chain(client, prompt)
            sequential = (time.perf_counter() - start) / sample * N
        print(f"SL-CAI network: {N} prompts × {ROUNDS} rounds ({N * (1 + 2 * ROUNDS)} calls), {CONCURRENCY} chains "
              f"in flight, {LATENCY_S * 1000:.0f} ms latency; ideal {ideal:.1f} s")
        print(f"  cai-async (incl. store + exports)  {ours:8.2f} s  x ideal {ours / ideal:5.2f}  (target <= 1.3)  "
              f"chains ok {stage['ok']}/{N}, server calls {stats['ok']}, repeats {stats['repeats']}")
        print(f"  asyncio.gather over AsyncOpenAI    {gathered:8.2f} s  x ideal {gathered / ideal:5.2f}  "
              f"cai-async is {gathered / ours:4.2f}x faster")
        print(f"  sequential openai loop             {sequential:8.2f} s  x ideal {sequential / ideal:5.2f}  "
              f"(extrapolated from {sample} chains)  cai-async is {sequential / ours:5.1f}x faster")
    finally:
        server.process.terminate()


def local(n: int = 6) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        prompts_file = _prompts(Path(tmp), n)
        times = {}
        for label, chains in (("one chain at a time (default)", None), ("chains interleaved (4)", 4)):
            recipe = Recipe.model_validate({
                "run_dir": str(Path(tmp) / f"run-{chains}"),
                "engine": {"groups": {"policy": [{"backend": "llamacpp", "model": "embedded",
                                                  "options": {"n_ctx": 2048}}]},
                           "progress": "off", "cache": {"enabled": False}},
                "sl": {"input": str(prompts_file), "id_column": "id", "num_revisions": 2, "constitution": "seed",
                       "draw": "priority", "max_tokens": 48, "critique_max_tokens": 48, "revision_max_tokens": 48,
                       "chain_concurrency": chains},
            })
            start = time.perf_counter()
            summary = asyncio.run(run_recipe(recipe))
            times[label] = time.perf_counter() - start
            tokens = summary["engine"]["tokens"]
            print(f"  local {label:<32} {times[label]:7.2f} s  {tokens} tokens  "
                  f"ok {summary['stages']['sl']['ok']}/{n}")
        first, second = times.values()
        print(f"  KV-cache-friendly order is {second / first:4.2f}x the speed of interleaving")


if __name__ == "__main__":
    which = set(sys.argv[1:]) or {"network", "local"}
    if "network" in which:
        network()
    if "local" in which:
        print("SL-CAI local: embedded SmolLM2, 6 prompts × 2 rounds")
        local()
