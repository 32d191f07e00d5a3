"""A quiet console: other libraries' warnings, log records and progress bars go to the run's log file (and
to the terminal only with --verbose); a run ends with one summary table and the paths to open next."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, TestServer
from tests.test_cli import cai

NOISY = """
import logging, sys, warnings
from cai_async.runlog import attach_run_log, quiet_console
quiet_console(verbose={verbose})
attach_run_log(sys.argv[1])
warnings.warn("gradient_checkpointing is deprecated", FutureWarning)
logging.getLogger("peft.tuners").warning("no config found")
logging.getLogger("cai_async.engine").warning("endpoint srv is down: connection refused")
from tqdm import tqdm
for _ in tqdm(range(3), desc="Map"):
    pass
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_third_party_noise_goes_to_the_run_log(tmp_path: Path, verbose: bool) -> None:
    out = subprocess.run([sys.executable, "-c", NOISY.format(verbose=verbose), str(tmp_path)],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    log = (tmp_path / "run.log").read_text(encoding="utf-8")
    for text in ("gradient_checkpointing is deprecated", "no config found", "endpoint srv is down"):
        assert text in log
    assert "endpoint srv is down: connection refused" in out.stderr  # ours always shows
    for text in ("gradient_checkpointing is deprecated", "no config found", "Map"):
        assert (text in out.stderr) is verbose, out.stderr


def test_a_run_ends_with_a_summary_table_and_where_to_look(tmp_path: Path, server: TestServer) -> None:
    recipe = tmp_path / "recipe.json"
    run_dir = tmp_path / "run"
    recipe.write_text(json.dumps({
        "run_dir": str(run_dir),
        "engine": {"groups": {"policy": [{"name": "srv", "backend": "openai", "model": "m",
                                          "base_url": server.base_url}]}, "progress": "off"},
        "sl": {"input": str(ROOT / "cai_async" / "data" / "quickstart_prompts.jsonl"), "limit": 3,
               "constitution": "harmless"},
    }), encoding="utf-8")
    out = cai("run", str(recipe))
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    header = next(i for i, line in enumerate(lines) if "run summary" in line)
    table = "\n".join(lines[header: header + 8])
    for column in ("stage", "rows", "failures", "time", "tokens", "cost"):
        assert column in table
    row = next(line for line in lines[header:] if line.strip("│┃ ").startswith("sl "))
    cells = [c.strip() for c in row.strip("│┃ ").split("│")]
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    usage = summary["stages"]["sl"]["usage"]
    assert cells[1] == "3" and cells[2] == "0" and cells[4] == f"{usage['tokens']:,}"
    assert usage["calls"] == server.stats()["ok"] == 3 * 3
    assert f"sft: {run_dir}/exports/sft.parquet" in out.stderr
    assert (run_dir / "run.log").is_file()


def test_each_stage_display_counts_its_own_items() -> None:
    from cai_async.engine.progress import format_progress, since

    base = {"done": 16, "failed": 1, "total": 17, "cache_hits": 3, "tokens": 1000, "cost_usd": 0.5}
    now = {"done": 30, "failed": 2, "total": 53, "cache_hits": 5, "tokens": 1600, "cost_usd": 0.75}
    stage = since(now, base)
    assert (stage["done"], stage["failed"], stage["total"], stage["tokens"]) == (14, 1, 36, 600)
    assert format_progress(stage, 10.0, label="rl").startswith("[rl] 15/36 done (1 failed, 2 cached)")
