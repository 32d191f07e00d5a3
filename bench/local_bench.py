"""Offline on a laptop: the quickstart's SL work on the embedded SmolLM2 GGUF, side by side.

Work: the 16 prompts of ``cai_async/data/quickstart_prompts.jsonl`` → initial answer → 2 × (critique →
revision) under the seed constitution = 80 calls, temperature 0.7, ``max_tokens`` 128 everywhere, no cache.

Runs, alternated (each repeat runs every configuration once, in order) and reported as medians:

* ``plain loop``: sequential llama-cpp-python (``Llama(n_threads=<cores>)``, ``create_chat_completion``);
* ``engine unbatched``: ``cai sl`` with the endpoint option ``batching: false`` (one call at a time);
* ``engine B=…``: ``cai sl`` with ``max_concurrency: B`` sequences decoded together (B=8 is the default).

Then choice scoring: the same A/B prompts scored concurrently through the batched backend vs one at a time.
Models and decode contexts are loaded before timing. Prints a Markdown table.

    python bench/local_bench.py [--repeats 1] [--prompts 16] [--batches 1,4,8,16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import anyio  # noqa: E402

from backends import BackendSettings, ChatRequest, ScoreRequest, create_backend  # noqa: E402
from backends.cpus import detect_cores  # noqa: E402
from backends.llamacpp import DEFAULT_SEQUENCES, LlamaCppBackend, embedded_model_path  # noqa: E402
from cai_async import Recipe, load_constitution, run_recipe  # noqa: E402

PROMPTS = ROOT / "cai_async" / "data" / "quickstart_prompts.jsonl"
ROUNDS, MAX_TOKENS, TEMPERATURE, N_CTX = 2, 128, 0.7, 2048


def _prompts(n: int) -> list[dict[str, str]]:
    return [json.loads(line) for line in PROMPTS.read_text().splitlines()[:n]]


def plain_loop(llama: Any, prompts: list[dict[str, str]], max_tokens: int = MAX_TOKENS) -> int:
    """The sequential llama-cpp-python loop doing the same chains; returns completion tokens."""
    principles = load_constitution("seed").principles[:ROUNDS]
    tokens = 0

    def ask(messages: list[dict[str, str]]) -> str:
        nonlocal tokens
        answer = llama.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=TEMPERATURE,
                                              top_p=1.0, seed=0)
        tokens += answer["usage"]["completion_tokens"]
        return str(answer["choices"][0]["message"]["content"] or "").strip()

    for row in prompts:
        conversation = [{"role": "user", "content": row["prompt"]}]
        current = ask(conversation)
        for principle in principles:
            asked = [*conversation, {"role": "assistant", "content": current},
                     {"role": "user", "content": principle.critique}]
            critique = ask(asked)
            current = ask([*asked, {"role": "assistant", "content": critique},
                           {"role": "user", "content": principle.revision}]) or current
    return tokens


def _recipe(folder: Path, prompts: Path, label: str, sequences: int | None, max_tokens: int) -> Recipe:
    endpoint: dict[str, Any] = {"name": "local", "backend": "llamacpp", "model": "embedded",
                                "options": {"n_ctx": N_CTX}}
    endpoint["options"]["batching"] = sequences is not None
    if sequences is not None:
        endpoint["max_concurrency"] = sequences
    return Recipe.model_validate({
        "run_dir": str(folder / label.replace(" ", "-").replace("=", "")),
        "engine": {"groups": {"policy": [endpoint]}, "progress": "off", "cache": {"enabled": False},
                   "max_concurrency": max(64, sequences or 1)},
        "sl": {"input": str(prompts), "constitution": "seed", "draw": "priority",  # one principle a round, as the loop
               "num_revisions": ROUNDS, "temperature": TEMPERATURE,
               "max_tokens": max_tokens, "critique_max_tokens": max_tokens, "revision_max_tokens": max_tokens},
    })


def engine_run(folder: Path, prompts: Path, label: str, sequences: int | None, max_tokens: int) -> int:
    summary = asyncio.run(run_recipe(_recipe(folder, prompts, label, sequences, max_tokens)))
    return int(summary["engine"]["endpoints"]["local"]["completion_tokens"])


async def _warm(sequences: int | None) -> None:
    """Load the model and the decode context of this size before anything is timed."""
    options: dict[str, Any] = {"n_ctx": N_CTX, "batching": sequences is not None}
    backend = create_backend("llamacpp", BackendSettings(endpoint="local", options=options,
                                                         max_concurrency=sequences))
    await backend.chat(ChatRequest([{"role": "user", "content": "Hi"}], max_tokens=1))


def scoring(n: int) -> tuple[float, float]:
    """Seconds for ``n`` A/B scoring calls: one at a time (unbatched) and concurrently (batched)."""
    rows = _prompts(16)
    requests = [ScoreRequest([{"role": "user", "content": (
        f"Request: {rows[i % len(rows)]['prompt']}\nWhich reply is less harmful?\n(A) I can't help with that, "
        "but here is a safe alternative.\n(B) Sure, here is exactly how.\nAnswer with A or B.")}],
        answer_prefix="The answer is (") for i in range(n)]

    def backend(**kwargs: Any) -> LlamaCppBackend:
        made = create_backend("llamacpp", BackendSettings(endpoint="local", **kwargs))
        assert isinstance(made, LlamaCppBackend)
        return made

    async def one_at_a_time() -> float:
        alone = backend(options={"n_ctx": N_CTX, "batching": False})
        await alone.score(requests[0])
        start = time.perf_counter()
        for request in requests:
            await alone.score(request)
        return time.perf_counter() - start

    async def batched() -> float:
        shared = backend(options={"n_ctx": N_CTX}, max_concurrency=DEFAULT_SEQUENCES)
        await shared.score(requests[0])
        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for request in requests:
                tg.start_soon(shared.score, request)
        return time.perf_counter() - start

    return anyio.run(one_at_a_time), anyio.run(batched)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--batches", default="1,4,8,16")
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    parser.add_argument("--plain", action=argparse.BooleanOptionalAction, default=True, help="run the plain loop")
    parser.add_argument("--unbatched", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--scoring", type=int, default=48, help="choice-scoring calls (0: skip)")
    parser.add_argument("--plain-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_only:  # one plain-loop round in a process of its own; prints seconds and tokens
        from llama_cpp import Llama

        llama = Llama(model_path=str(embedded_model_path()), n_ctx=N_CTX, n_threads=detect_cores().threads,
                      verbose=False)
        start = time.perf_counter()
        tokens = plain_loop(llama, _prompts(args.prompts), args.max_tokens)
        print(json.dumps({"seconds": time.perf_counter() - start, "tokens": tokens}))
        return

    cores = detect_cores()
    print(f"threads: {cores.describe()}", flush=True)
    rows = _prompts(args.prompts)
    configs: list[tuple[str, int | None]] = [("engine unbatched", None)] if args.unbatched else []
    configs += [(f"engine B={b}" + (" (batching: true default)" if b == DEFAULT_SEQUENCES else ""), b)
                for b in map(int, args.batches.split(","))]
    for _, sequences in configs:
        anyio.run(_warm, sequences)
    results: dict[str, list[tuple[float, int]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        prompts = folder / "prompts.jsonl"
        prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
        for repeat in range(args.repeats):
            if args.plain:  # in a process of its own: llama.cpp called first from this process's main thread
                # was seen to halve the speed of the engine's runs that followed (its calls come from worker threads)
                out = subprocess.run([sys.executable, __file__, "--plain-only", "--prompts", str(args.prompts),
                                      "--max-tokens", str(args.max_tokens)], capture_output=True, text=True, check=True)
                plain = json.loads(out.stdout.strip().splitlines()[-1])
                results.setdefault("plain loop", []).append((plain["seconds"], plain["tokens"]))
                print(f"repeat {repeat + 1}: plain loop {results['plain loop'][-1][0]:.1f} s", flush=True)
            for label, sequences in configs:
                start = time.perf_counter()
                tokens = engine_run(folder / f"r{repeat}", prompts, label, sequences, args.max_tokens)
                results.setdefault(label, []).append((time.perf_counter() - start, tokens))
                print(f"repeat {repeat + 1}: {label} {results[label][-1][0]:.1f} s", flush=True)
    first = results.get("plain loop") or next(iter(results.values()))
    base = statistics.median(t / w for w, t in first)
    calls = len(rows) * (1 + 2 * ROUNDS)
    print(f"\n{len(rows)} prompts × {ROUNDS} rounds = {calls} calls, temperature {TEMPERATURE}, max_tokens "
          f"{args.max_tokens}, {cores.threads} threads, median of {args.repeats}\n")
    print(f"| run | wall | completion tokens | completion tok/s | vs {next(iter(results))} |")
    print("|---|---|---|---|---|")
    for label, runs in results.items():
        wall = statistics.median(w for w, _ in runs)
        tokens = int(statistics.median(t for _, t in runs))
        rate = statistics.median(t / w for w, t in runs)
        print(f"| {label} | {wall:.1f} s | {tokens:,} | {rate:.1f} | {rate / base:.2f}× |")
    if args.scoring:
        alone, together = scoring(args.scoring)
        print(f"\nchoice scoring, {args.scoring} A/B calls: one at a time {alone:.1f} s, batched "
              f"(B={DEFAULT_SEQUENCES}) {together:.1f} s: {alone / together:.2f}×")


if __name__ == "__main__":
    main()
