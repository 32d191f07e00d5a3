"""Batch API benchmark: the same SL-CAI job online and through the Batch API, against the test server's
implementation of the documented API (the hosted API is not reachable here), in one invocation.

Prints, for each mode: wall time, dollars (at the recipe's prices; batch at half), model calls, batches, and
requests submitted twice. The batch wall time is set by the server's simulated queue (``--progress-s``), not
by the client; what the client controls is the number of rounds (one per dependent step) and that it submits
every request exactly once.

    python bench/batch_bench.py                 # 200 prompts, 2 revisions
    python bench/batch_bench.py 500 1           # prompts, revisions
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import anyio  # noqa: E402

from cai_async import Recipe, run_recipe  # noqa: E402
from tests.conftest import start_server  # noqa: E402

PROMPTS = ROOT.parent / "shared" / "data" / "hh_rlhf" / "harmless_base_test_first_human_turns.jsonl"


def recipe(base_url: str, run_dir: str, mode: str, prompts: int, revisions: int) -> Recipe:
    return Recipe.model_validate({
        "run_dir": run_dir,
        "engine": {"groups": {"policy": [{
            "name": "srv", "backend": "openai", "model": "m", "base_url": base_url, "mode": mode,
            "price_in": 0.15, "price_out": 0.60,
            "batch": {"linger_s": 0.2, "poll_initial_s": 0.2, "poll_max_s": 1.0},
        }]}, "progress": "off"},
        "sl": {"input": str(PROMPTS), "id_column": "id", "limit": prompts, "num_revisions": revisions,
               "max_tokens": 64, "critique_max_tokens": 64, "revision_max_tokens": 64},
    })


def main() -> None:
    prompts = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    revisions = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    server = start_server("--latency-ms", "200", "--batch-progress-s", "1.0")
    rows: dict[str, dict[str, Any]] = {}
    try:
        for mode in ("online", "batch"):
            server.reset()
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                summary = anyio.run(run_recipe, recipe(server.base_url, tmp, mode, prompts, revisions))
                wall = time.perf_counter() - start
            stats = server.stats()
            rows[mode] = {"wall": wall, "cost": summary["engine"]["cost_usd"], "ok": summary["stages"]["sl"]["ok"],
                          "batches": stats.get("batches", 0), "calls": stats.get("ok", 0) + stats.get(
                              "batch_requests", 0), "repeats": stats.get("batch_repeats", 0)}
    finally:
        server.process.terminate()
    calls = prompts * (1 + 2 * revisions)
    print(f"SL-CAI: {prompts} prompts x (1 + 2 x {revisions}) = {calls} model calls; server latency 200 ms online, "
          f"1 s queue per batch")
    for mode, row in rows.items():
        print(f"  {mode:<7} wall {row['wall']:7.2f}s  cost ${row['cost']:.4f}  chains ok {row['ok']}  "
              f"model calls {row['calls']}  batches {row['batches']}  repeats {row['repeats']}")
    online, batch = rows["online"], rows["batch"]
    print(f"  => batch / online cost: {batch['cost'] / online['cost']:.2f}x; rounds: {batch['batches']} "
          f"(one per dependent step: initial, then critique and revision per round = {1 + 2 * revisions})")


if __name__ == "__main__":
    main()
