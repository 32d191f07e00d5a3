"""A user's fresh clone: the repository's tracked files alone, in a folder with nothing beside it, run the
quickstart's evaluation stage and ``cai label-quality`` on the embedded model (no data outside the copy)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def _tracked_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: no tracked files to copy")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    return [name for name in out.stdout.decode().split("\0") if name]


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tracked files copied into ``<tmp>/project``; ``<tmp>`` holds nothing else."""
    project = tmp_path_factory.mktemp("fresh") / "project"
    for name in _tracked_files():
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the working tree is not in a clone of it either
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, project / name)
    assert [p.name for p in project.parent.iterdir()] == ["project"]
    return project


def _cai(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(project)}
    return subprocess.run([sys.executable, "-m", "cai_async.cli", *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=600)


def test_the_quickstart_evaluation_runs_in_a_fresh_clone(clone: Path) -> None:
    # The quickstart's eval stage as written, except that "after" (the model its train stage writes) is the
    # embedded GGUF too: training is not what this test is about.
    after = "engine.groups.after=[{name: after, backend: llamacpp, model: embedded, options: {n_ctx: 2048}}]"
    out = _cai(clone, "eval", "recipes/quickstart.yaml", "--n", "2", "--run-dir", "runs/fresh", "--progress", "off",
               "--set", after)
    assert out.returncode == 0, out.stderr[-3000:]
    run = clone / "runs" / "fresh" / "eval"
    samples = pl.read_parquet(sorted((run / "samples").glob("*.parquet")))
    assert sorted(samples["model"].unique()) == ["after", "before"] and samples.height == 2 * 4
    assert set(samples["suite"]) == {"harmlessness", "overrefusal"} and (samples["status"] == "ok").all()
    assert (run / "report.html").stat().st_size > 1000 and json.loads((run / "metrics.json").read_text())["models"]


def test_label_quality_runs_in_a_fresh_clone(clone: Path) -> None:
    out = _cai(clone, "label-quality", "--limit", "4", "--ensemble", "1", "--backend", "llamacpp", "--model",
               "embedded", "--run-dir", "runs/lq", "--progress", "off")
    assert out.returncode == 0, out.stderr[-3000:]
    folder = clone / "runs" / "lq" / "label_quality"
    report = json.loads((folder / "report.json").read_text())
    assert report["pairs"] == 4 and (folder / "report.md").is_file() and (folder / "reliability.png").is_file()
    assert "label_quality/report.json" in out.stdout + out.stderr
