"""Red-team benchmark: attempts per second through the engine against the test server, and, measured in the same
run as the baseline, the SL stage's call throughput on the same server, latency and concurrency (the redteam
stage should drive the engine as fast: calls/s within 10% of SL's).

Each attempt: one target call (the answer is not a refusal, so it is judged) + one judge call per principle of
the ``harmless`` set (8) = 9 calls; ``multi_turn`` adds two target calls. SL: initial → critique → revision.

    python bench/redteam_bench.py                 # 40 seeds × (direct, encode ×4, persona ×4), 20 ms, 64 in flight
    python bench/redteam_bench.py 100 50 100      # seeds, latency ms, concurrency
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import anyio  # noqa: E402

from cai_async import Recipe, run_recipe  # noqa: E402
from tests.conftest import TestServer, start_server  # noqa: E402


def _engine(server: TestServer, concurrency: int) -> dict[str, Any]:
    endpoint = {"name": "test", "backend": "openai", "model": "m", "base_url": server.base_url,
                "max_concurrency": concurrency}
    return {"groups": {"policy": [endpoint], "critic": [{**endpoint, "name": "judge"}]}, "progress": "off",
            "max_concurrency": concurrency, "cache": {"enabled": False}}


def _run(data: dict[str, Any], stage: str) -> tuple[float, int, int]:
    """(wall seconds, items, calls) of one stage's run."""
    recipe = Recipe.model_validate(data)
    start = time.perf_counter()
    summary = anyio.run(lambda: run_recipe(recipe))
    wall = time.perf_counter() - start
    report = summary["stages"][stage]
    return wall, report["written"], int(report["usage"]["calls"])


def main(seeds: int, latency_ms: float, concurrency: int) -> dict[str, Any]:
    server = start_server("--latency-ms", str(latency_ms))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            redteam = {"run_dir": str(folder / "rt"), "engine": _engine(server, concurrency),
                       "redteam": {"seeds": ["advbench"], "n": seeds, "strategies": ["direct", "encode", "persona"],
                                   "max_tokens": 32}}
            rt_wall, attempts, rt_calls = _run(redteam, "redteam")
            prompts = folder / "prompts.jsonl"
            source = ROOT / "cai_async" / "data" / "public" / "hh_rlhf" / "harmless_base_test_first_human_turns.jsonl"
            lines = source.read_text(encoding="utf-8").splitlines()
            chains = max(1, rt_calls // 3)  # about as many calls as the redteam run made
            prompts.write_text("\n".join(lines[i % len(lines)].replace('"id": "', f'"id": "{i}-', 1)
                                         for i in range(chains)) + "\n")
            sl = {"run_dir": str(folder / "sl"), "engine": _engine(server, concurrency),
                  "sl": {"input": str(prompts), "id_column": "id", "num_revisions": 1, "constitution": "harmless",
                         "max_tokens": 32, "critique_max_tokens": 32, "revision_max_tokens": 32}}
            sl_wall, chains_done, sl_calls = _run(sl, "sl")
    finally:
        server.process.terminate()
        server.process.wait(timeout=10)
    ideal = concurrency / (latency_ms / 1000.0)
    result: dict[str, Any] = {
        "latency_ms": latency_ms, "concurrency": concurrency, "ideal_calls_per_s": round(ideal, 1),
        "redteam": {"attempts": attempts, "calls": rt_calls, "wall_s": round(rt_wall, 2),
                    "attempts_per_s": round(attempts / rt_wall, 1), "calls_per_s": round(rt_calls / rt_wall, 1)},
        "sl": {"chains": chains_done, "calls": sl_calls, "wall_s": round(sl_wall, 2),
               "calls_per_s": round(sl_calls / sl_wall, 1)},
    }
    result["redteam_vs_sl_calls_per_s"] = round(result["redteam"]["calls_per_s"] / result["sl"]["calls_per_s"], 3)
    return result


if __name__ == "__main__":
    args = [float(a) for a in sys.argv[1:4]]
    seeds, latency, concurrency = (int(args[0]) if args else 40, args[1] if len(args) > 1 else 20.0,
                                   int(args[2]) if len(args) > 2 else 64)
    print(json.dumps(main(seeds, latency, concurrency), indent=2))
