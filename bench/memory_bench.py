"""Memory flat in N: peak RSS and wall of SL-CAI (2 revisions) on the test server at several sizes, each size in
a process of its own that measures its own peak RSS (``resource.getrusage``: ``ru_maxrss``). The prompts are
the public HH-RLHF red-team turns (../shared/data) cycled to the size with a counter, so every prompt is new.

    python bench/memory_bench.py                          # 2k, 10k, 30k
    python bench/memory_bench.py --sizes 2000,10000,30000,100000 --latency-ms 5 --concurrency 256
    python bench/memory_bench.py --baseline /path/to/other/checkout   # the same sizes with another tree's code
    python bench/memory_bench.py --end-only --sizes 2000,30000,100000,300000

``--end-only`` measures the stage's end alone, quickly at any size: chain rows from a 200-prompt run are copied
under new ids into shards of 64 rows (as a run leaves them), then each size's process reads the resume ids
(``finished_ids``), compacts, writes the exports and computes ``cai show``'s statistics.

Target: peak RSS at the largest size within +25% of the smallest. What the run leaves is reported too: shard
files in ``sl/`` (compacted at the end of the stage) and the exports' rows.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.environ.get("CAI_BENCH_TREE", str(ROOT)))  # a size measured with another tree's code

SOURCE = ROOT.parent / "shared" / "data" / "hh_rlhf" / "harmless_base_test_first_human_turns.jsonl"


def _prompts(path: Path, n: int) -> None:
    base = [json.loads(line)["prompt"] for line in SOURCE.read_text().splitlines() if line.strip()]
    with path.open("w", encoding="utf-8") as handle:
        for i in range(n):
            handle.write(json.dumps({"id": f"p{i}", "prompt": f"{base[i % len(base)]} (#{i})"}) + "\n")


def one(n: int, base_url: str, concurrency: int, folder: Path) -> dict[str, object]:
    """Run one size in this process; return wall, peak RSS and what the run left."""
    import anyio

    from cai_async import Recipe, run_recipe

    prompts = folder / "prompts.jsonl"
    _prompts(prompts, n)
    recipe = Recipe.model_validate({
        "run_dir": str(folder / "run"),
        "engine": {"groups": {"policy": [{"backend": "openai", "model": "m", "base_url": base_url}]},
                   "max_concurrency": concurrency, "progress": "off"},
        "sl": {"input": str(prompts), "id_column": "id", "num_revisions": 2, "constitution": "harmless",
               "max_tokens": 64, "critique_max_tokens": 64, "revision_max_tokens": 64},
    })
    start = time.perf_counter()
    summary = anyio.run(run_recipe, recipe)
    wall = time.perf_counter() - start
    stage = summary["stages"]["sl"]
    shards = sorted(p.name for p in (folder / "run" / "sl").glob("part-*.parquet"))
    from cai_async.runinfo import describe_run

    shown = describe_run(folder / "run")["stages"]["sl"]  # what `cai show` reads, inside the measured process
    return {"n": n, "wall_s": round(wall, 2), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                                                   / 1024, 1),
            "ok": stage["ok"], "calls_per_s": round(n * 5 / wall, 1), "shard_files": len(shards),
            "sft_rows": stage["exports"]["sft"]["rows"], "shown_ok": shown["ok"]}


def write_chains(n: int, seed: Path, folder: Path) -> None:
    """``n`` chain rows, copied from ``seed``'s under new ids, as shards of 64 rows (as a run leaves them)."""
    from cai_async.stages.sl import CHAIN_SCHEMA
    from cai_async.store import ShardWriter, read_shards

    rows = read_shards(seed).to_dicts()
    writer = ShardWriter(folder / "sl", shard_rows=64, schema=CHAIN_SCHEMA)
    for i in range(n):
        writer.add({**rows[i % len(rows)], "id": f"c{i}"})
    writer.flush()


def end_only(folder: Path) -> dict[str, object]:
    """The stage's end over ``folder``'s chains, in this process (see ``--end-only``)."""
    from cai_async.exports import SL_COLUMNS, ExportConfig, write_sl_exports
    from cai_async.runinfo import describe_run
    from cai_async.stages.common import finished_ids
    from cai_async.store import ShardWriter, compact_shards, scan_shards, shard_files

    small = len(shard_files(folder / "sl"))
    start = time.perf_counter()
    done, _ = finished_ids(ShardWriter(folder / "sl"))
    compact_shards(folder / "sl")
    info = write_sl_exports(folder, scan_shards(folder / "sl", columns=SL_COLUMNS), ExportConfig())
    shown = describe_run(folder)["stages"]["sl"]
    return {"n": shown["rows"], "wall_s": round(time.perf_counter() - start, 2), "peak_rss_mb": round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), "ok": shown["ok"], "resume_ids": len(done),
        "small_shards": small, "shard_files": len(shard_files(folder / "sl")), "sft_rows": info["sft"]["rows"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2000,10000,30000", help="Comma-separated prompt counts.")
    parser.add_argument("--latency-ms", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--baseline", default=None, help="Another checkout to run the same sizes with, for contrast.")
    parser.add_argument("--end-only", action="store_true", help="Measure the stage's end alone (see above).")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--base-url", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seed", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.folder is not None:
        if args.seed:
            write_chains(args.one, Path(args.seed), Path(args.folder))
        else:
            print(json.dumps(end_only(Path(args.folder))))
        return
    if args.one is not None:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(one(args.one, args.base_url, args.concurrency, Path(tmp))))
        return
    from tests.conftest import start_server

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still stops the test server (finally below)
    server = start_server()
    server.configure(latency_ms=args.latency_ms)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.end_only:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                one(200, server.base_url, args.concurrency, Path(tmp))
            finally:
                server.process.terminate()
            _end_only(sizes, Path(tmp) / "run" / "sl")
        return
    trees = [("this tree", ROOT)] + ([("baseline", Path(args.baseline).resolve())] if args.baseline else [])
    print(f"SL-CAI, 2 revisions (5 calls a prompt), test server at {args.latency_ms:g} ms, concurrency "
          f"{args.concurrency}; each size in its own process", flush=True)
    try:
        for label, tree in trees:
            results = []
            for n in sizes:
                env = {**os.environ, "PYTHONPATH": str(tree), "CAI_BENCH_TREE": str(tree)}
                out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--one", str(n), "--base-url",
                                      server.base_url, "--concurrency", str(args.concurrency)],
                                     capture_output=True, text=True, env=env, cwd=tree, check=False)
                if out.returncode != 0:
                    print(f"  {label} n={n}: failed\n{out.stderr[-2000:]}")
                    break
                row = json.loads(out.stdout.strip().splitlines()[-1])
                results.append(row)
                print(f"  {label:<10} {row['n']:>7} prompts  wall {row['wall_s']:8.1f} s  "
                      f"{row['calls_per_s']:7.0f} calls/s  peak RSS {row['peak_rss_mb']:7.1f} MB  "
                      f"shard files {row['shard_files']:>4}  ok {row['ok']}  sft rows {row['sft_rows']}", flush=True)
            if len(results) > 1:
                first, last = results[0], results[-1]
                growth = last["peak_rss_mb"] / first["peak_rss_mb"] - 1  # type: ignore[operator]
                print(f"  {label}: peak RSS {first['n']} → {last['n']} prompts: {growth:+.0%} (target ≤ +25%)",
                      flush=True)
    finally:
        server.process.terminate()


def _end_only(sizes: list[int], seed: Path) -> None:
    print("The stage's end alone (resume ids, compaction, exports, cai show), chains in shards of 64 rows; each "
          "size in its own process", flush=True)
    results = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as folder:
            script = [sys.executable, str(Path(__file__).resolve()), "--one", str(n), "--folder", folder]
            subprocess.run([*script, "--seed", str(seed)], check=True)  # written in a process of its own
            out = subprocess.run(script, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            print(f"  n={n}: failed\n{out.stderr[-2000:]}")
            break
        row = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(row)
        print(f"  {row['n']:>8} chains  {row['small_shards']:>6} shards → {row['shard_files']:>4} files  "
              f"{row['wall_s']:7.1f} s  peak RSS {row['peak_rss_mb']:6.1f} MB  ok {row['ok']}  "
              f"resume ids {row['resume_ids']}  "
              f"sft rows {row['sft_rows']}", flush=True)
    if len(results) > 1:
        growth = results[-1]["peak_rss_mb"] / results[0]["peak_rss_mb"] - 1
        print(f"  peak RSS {results[0]['n']} → {results[-1]['n']} chains: {growth:+.0%} (target ≤ +25%)")


if __name__ == "__main__":
    main()
