"""RL-CAI labelling benchmark, with baselines measured in the same run.

local:   the feedback prompts of real hh-rlhf pairs scored on the embedded model by reading the last
         position's logits after ``eval()`` (the default) vs llama.cpp's logprobs path (``logits_all=True``).
network: 1,000 pairs × 2 orders × 2 principles (4,000 scoring calls) through the test server at its
         configured rate (12,000 requests/minute, answered by 429 beyond it): wall time vs the rate's ideal,
         lost calls, and 429s seen.

    python bench/label_bench.py [local] [network]
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends import BackendSettings, ScoreRequest, create_backend  # noqa: E402
from cai_async import EndpointConfig, Engine, EngineConfig, LabelConfig, human_pairs, run_label  # noqa: E402
from cai_async.constitution_io import load_comparison_set  # noqa: E402
from cai_async.judging import ANSWER_PREFIX, multiple_choice_prompt  # noqa: E402
from tests.conftest import start_server  # noqa: E402

HH = ROOT.parent / "shared" / "data" / "hh_rlhf" / "harmless-base" / "test.jsonl.gz"


def local(n_pairs: int = 6) -> None:
    pairs = human_pairs(HH, limit=n_pairs)
    questions = [p.question for p in load_comparison_set("harmless").principles[:2]]
    requests = [
        ScoreRequest([{"role": "user", "content": multiple_choice_prompt(p.messages, q, a, b)}],
                     answer_prefix=ANSWER_PREFIX)
        for p in pairs for q in questions for a, b in ((p.response_a, p.response_b), (p.response_b, p.response_a))
    ]

    async def timed(method: str) -> tuple[float, list[float]]:
        backend = create_backend("llamacpp", BackendSettings(endpoint=method, options={"score_method": method,
                                                                                     "n_ctx": 4096}))
        await backend.score(requests[0])  # load the model outside the timing
        start = time.perf_counter()
        probs = [(await backend.score(r)).probs["A"] for r in requests]
        elapsed = time.perf_counter() - start
        await backend.aclose()
        return elapsed, probs

    def naive() -> float:
        """What a plain llama-cpp-python user writes: a logits_all model, chat completion with top_logprobs,
        no KV reuse between calls."""
        import llama_cpp

        from backends.llamacpp import embedded_model_path

        llama = llama_cpp.Llama(str(embedded_model_path()), n_ctx=4096, logits_all=True, verbose=False)
        start = time.perf_counter()
        for request in requests:
            llama.reset()
            llama.create_chat_completion([dict(m) for m in request.messages], max_tokens=1, logprobs=True,  # type: ignore[misc]
                                         top_logprobs=20, temperature=0.0)
        return time.perf_counter() - start

    logits_s, by_logits = asyncio.run(timed("logits"))
    logprobs_s, by_logprobs = asyncio.run(timed("logprobs"))
    naive_s = naive()
    gap = max(abs(x - y) for x, y in zip(by_logits, by_logprobs, strict=True))
    print(f"local scoring, embedded SmolLM2, {len(requests)} feedback prompts from {n_pairs} hh-rlhf pairs")
    print(f"  logits after eval() (default)  {logits_s:7.2f} s  {logits_s / len(requests) * 1000:7.0f} ms/call")
    print(f"  logprobs (logits_all=True)     {logprobs_s:7.2f} s  {logprobs_s / len(requests) * 1000:7.0f} ms/call")
    print(f"  naive chat logprobs, no KV reuse {naive_s:5.2f} s  {naive_s / len(requests) * 1000:7.0f} ms/call")
    print(f"  logits path is {logprobs_s / logits_s:4.1f}x faster than our logprobs path (target >= 5x), "
          f"{naive_s / logits_s:4.1f}x faster than the naive path; max |P(A) difference| {gap:.4f}")


def network(n_pairs: int = 1000, rpm: int = 12000) -> None:
    server = start_server()
    try:
        server.configure(rpm=rpm)
        pairs = human_pairs(HH, limit=n_pairs)
        calls = len(pairs) * 2 * 2
        ideal = calls / (rpm / 60)
        with tempfile.TemporaryDirectory() as tmp:
            config = EngineConfig(groups={"critic": [EndpointConfig(backend="openai", model="m",
                                                                    base_url=server.base_url)]},
                                  max_concurrency=64, progress="off")

            async def go() -> tuple[float, object]:
                async with Engine(config, run_dir=tmp) as engine:
                    start = time.perf_counter()
                    report = await run_label(engine, LabelConfig(ensemble=2), pairs, Path(tmp) / "labels")
                    return time.perf_counter() - start, report

            elapsed, report = asyncio.run(go())
        stats = server.stats()
        print(f"network labelling: {len(pairs)} pairs × 2 orders × 2 principles = {calls} scoring calls at "
              f"{rpm}/min (ideal {ideal:.1f} s)")
        print(f"  wall {elapsed:6.2f} s  x ideal {elapsed / ideal:4.2f}  labelled {report.labelled}  "  # type: ignore[attr-defined]
              f"lost {len(pairs) - report.labelled - report.abstained}  server ok {stats['ok']}  "  # type: ignore[attr-defined]
              f"429s {stats.get('429', 0)}")
    finally:
        server.process.terminate()


if __name__ == "__main__":
    which = set(sys.argv[1:]) or {"local", "network"}
    if "local" in which:
        local()
    if "network" in which:
        network()
