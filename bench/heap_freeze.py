"""How long a full garbage collection stalls a serving process, with the heap as ``cai guard serve`` leaves it
at startup and after :func:`cai_async.serving.freeze_startup_heap` (what the guard proxy and ``cai reward
serve`` now call once they listen). In one process: build the guard proxy's app as ``serve_guard`` builds it (an
engine, a guard, the aiohttp app; every module ``cai guard serve`` imports), add the objects a while of serving
keeps alive, then time ``gc.collect()`` (the full collection CPython runs on its own every so often, during
which the event loop — every request in flight — waits). The ratio is the stall before over after.

    .venv/bin/python bench/heap_freeze.py [--repeats 7] [--live 20000]"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import anyio  # noqa: E402

import cai_async.cli.app  # noqa: E402, F401  (what `cai guard serve` has imported when it serves)
from cai_async.engine import Engine, EngineConfig  # noqa: E402
from cai_async.guard import Guard, GuardConfig, UpstreamConfig, build_proxy_app  # noqa: E402
from cai_async.serving import freeze_startup_heap  # noqa: E402


def full_collection_ms(repeats: int) -> float:
    """Median milliseconds of a full collection (``gc.collect()``, all generations)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        gc.collect()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def serving_objects(count: int) -> list[dict[str, Any]]:
    """Objects a while of serving keeps alive (requests in flight, pooled connections, buffered verdicts)."""
    return [{"id": i, "messages": [{"role": "user", "content": "x"}]} for i in range(count)]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7, help="collections timed per side (their median)")
    parser.add_argument("--live", type=int, default=20000, help="objects serving keeps alive, as small dicts")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = EngineConfig.model_validate({"groups": {"critic": [
            {"backend": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1"}]}, "progress": "off"})
        async with Engine(config, run_dir=tmp) as engine:
            guard_config = GuardConfig(upstream=UpstreamConfig(base_url="http://127.0.0.1:9/v1"))
            app = build_proxy_app(Guard(engine, guard_config), guard_config)
            tracked = len(gc.get_objects())
            live = serving_objects(args.live)
            before = full_collection_ms(args.repeats)
            del live
            freeze_startup_heap()
            live = serving_objects(args.live)  # created after the freeze, as serving creates them
            after = full_collection_ms(args.repeats)
            print(f"heap at startup: {tracked:,} objects tracked by the collector; serving adds {len(live):,}")
            print(f"full collection, startup heap: {before:7.2f} ms (median of {args.repeats})")
            print(f"full collection, frozen heap:  {after:7.2f} ms (only what serving created is scanned)")
            print(f"stall before / after: {before / after:.1f}×")
            gc.unfreeze()
            del app, live


if __name__ == "__main__":
    anyio.run(main)
