"""The loop's time split: how long each step of each round took (and the held-out baseline), and each step's share
of the whole, from a loop run's ``loop.json``; with ``--run``, the loop is run first (``cai loop RECIPE``), timed
from outside as well (process start, model loads and all).

    python bench/loop_bench.py --run recipes/loop.yaml      # one round on the embedded SmolLM2, then the split
    python bench/loop_bench.py runs/loop                     # the split of a loop already run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent


def split(state: dict[str, Any]) -> list[tuple[str, str, float]]:
    """(round, step, seconds) for the baseline and every recorded step."""
    rows = [("start", "heldout (baseline)", float(state["baseline"].get("seconds", 0)))] if state.get("baseline") \
        else []
    for entry in state["rounds"]:
        rows += [(f"round {entry['round']}", step, float(info.get("seconds", 0)))
                 for step, info in entry["steps"].items()]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("target", help="a loop run directory, or with --run a loop recipe")
    parser.add_argument("--run", action="store_true", help="run `cai loop TARGET` first")
    args = parser.parse_args()
    wall = None
    if args.run:
        start = time.perf_counter()
        done = subprocess.run([str(ROOT / ".venv" / "bin" / "cai"), "loop", args.target], check=False)
        wall = time.perf_counter() - start
        if done.returncode:
            sys.exit(f"cai loop exited {done.returncode}")
        run_dir = Path(yaml.safe_load(Path(args.target).read_text())["run_dir"])
    else:
        run_dir = Path(args.target)
    state = json.loads((run_dir / "loop.json").read_text())
    rows = split(state)
    total = sum(seconds for _, _, seconds in rows)
    print(f"loop time split ({run_dir}):")
    for where, step, seconds in rows:
        print(f"  {where:<8} {step:<20} {seconds:8.1f} s  {seconds / total:6.1%}" if total else f"  {where} {step}")
    print(f"  {'steps in all':<29} {total:8.1f} s")
    if wall is not None:
        print(f"  {'cai loop, wall clock':<29} {wall:8.1f} s (imports, model loads and reports included)")


if __name__ == "__main__":
    main()
