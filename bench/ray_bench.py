"""``executor: ray`` throughput: SL-CAI chains on the test server with 1, 2 and 4 engine actors, beside the
single-process engine, in one invocation on one local Ray cluster.

2,000 prompts × 2 revisions = 10,000 calls at 20 ms a call; each actor keeps ``batch_size × batches_per_actor``
= 128 chains in flight, so the latency-bound ideal wall with k actors is 10,000 × 0.02 s / (128 k). Printed per
run: wall, aggregate requests/s (calls the server answered ÷ wall), wall ÷ ideal, and the speed-up over one
actor. The test server is one process on the same machine: where the requests/s stop growing, that is its limit
(or the machine's CPUs), not Ray's.

    python bench/ray_bench.py [N_PROMPTS]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cai_async import run_recipe  # noqa: E402
from tests.conftest import TestServer, start_server  # noqa: E402
from tests.test_ray_executor import prompts, sl_recipe  # noqa: E402

LATENCY_S, BATCH, PER_ACTOR = 0.02, 64, 2


def one(server: TestServer, folder: Path, source: Path, n: int, executor: str, actors: int) -> dict[str, Any]:
    server.reset()
    recipe = sl_recipe(server, folder / f"{executor}-{actors}", source, executor=executor,
                       ray={"actors": actors, "batch_size": BATCH, "batches_per_actor": PER_ACTOR})
    recipe.engine.max_concurrency = BATCH * PER_ACTOR * actors  # the same chains in flight as k actors
    start = time.perf_counter()
    summary = anyio.run(run_recipe, recipe)
    wall = time.perf_counter() - start
    calls = server.stats()["ok"]
    assert summary["stages"]["sl"]["ok"] == n and calls == n * 5, (summary["stages"]["sl"], calls)
    ideal = calls * LATENCY_S / (BATCH * PER_ACTOR * actors)
    return {"executor": executor, "actors": actors, "wall_s": wall, "stage_s": summary["stages"]["sl"]["seconds"],
            "calls": calls, "rps": calls / wall, "ideal_s": ideal}


def main() -> None:
    import ray

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    server = start_server("--latency-ms", str(LATENCY_S * 1000))
    ray.init(num_cpus=5, include_dashboard=False, log_to_driver=False, configure_logging=False)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            source = prompts(folder, n)
            rows.append(one(server, folder, source, n, "local", 1))
            for actors in (1, 2, 4):
                rows.append(one(server, folder, source, n, "ray", actors))
    finally:
        ray.shutdown()
        server.process.terminate()
    base = next(r for r in rows if r["executor"] == "ray" and r["actors"] == 1)
    print(f"\nSL-CAI, {n} prompts × 2 revisions ({n * 5} calls), test server at {LATENCY_S * 1000:.0f} ms a call, "
          f"{BATCH}×{PER_ACTOR} chains in flight per actor (local: the same in one process)")
    print(f"{'executor':>9} {'actors':>6} {'wall s':>7} {'stage s':>8} {'req/s':>7} {'ideal s':>8} {'wall/ideal':>10} "
          f"{'vs 1 actor':>10}")
    for r in rows:
        print(f"{r['executor']:>9} {r['actors']:>6} {r['wall_s']:7.1f} {r['stage_s']:8.1f} {r['rps']:7.0f} "
              f"{r['ideal_s']:8.1f} {r['wall_s'] / r['ideal_s']:10.1f} {base['wall_s'] / r['wall_s']:10.2f}x")


if __name__ == "__main__":
    main()
