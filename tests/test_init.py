"""``pip install cai-async`` has a recipe to start from: the example recipes ship in the package (the same files
as ``recipes/``), ``cai init`` writes them with the data they read, and the built wheel, installed in a venv of
its own, runs ``cai init`` + ``cai plan`` from the installed package (not from this checkout)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from cai_async.examples import RECIPES, example_recipes
from cai_async.loop.config import load_loop_recipe
from cai_async.recipes import load_recipe
from tests.conftest import ROOT
from tests.test_cli import cai

REPOSITORY_RECIPES = ROOT / "recipes"


def test_packaged_recipes_are_the_repository_recipes() -> None:
    names = sorted(p.relative_to(REPOSITORY_RECIPES) for p in REPOSITORY_RECIPES.rglob("*.yaml"))
    assert names == example_recipes(), "copy recipes/ into cai_async/data/recipes/ (or back): they must be equal"
    for name in names:
        assert (RECIPES / name).read_bytes() == (REPOSITORY_RECIPES / name).read_bytes(), (
            f"recipes/{name} and cai_async/data/recipes/{name} differ: copy the one you changed over the other")


def test_init_writes_recipes_that_load(tmp_path: Path) -> None:
    out = cai("init", str(tmp_path / "start"))
    assert out.returncode == 0, out.stderr
    start = tmp_path / "start"
    files = [p for p in start.rglob("*") if p.is_file()]
    assert f"wrote {len(files)} files" in out.stderr, out.stderr
    assert (start / "data" / "quickstart_prompts.jsonl").is_file()
    assert (start / "data" / "public" / "hh_rlhf" / "LICENSE").is_file()  # a slice's licence goes with its copy
    for name in example_recipes():
        text = (start / "recipes" / name).read_text(encoding="utf-8")
        assert "../cai_async/" not in text, name
        for named in re.findall(r"\.\./data/([\w./-]+)", text):
            assert (start / "data" / named).is_file(), f"{name} names data/{named}, which init did not write"
        if name.parent == Path("."):  # the accelerate configs are no recipes
            loop = re.search(r"^loop:", text, re.MULTILINE) is not None  # `cai loop RECIPE` reads it
            (load_loop_recipe if loop else load_recipe)(start / "recipes" / name)
    (start / "recipes" / "quickstart.yaml").write_text("# mine\n", encoding="utf-8")
    again = cai("init", str(start))
    assert again.returncode == 0 and f"kept {len(files)} already there" in again.stderr, again.stderr
    assert (start / "recipes" / "quickstart.yaml").read_text(encoding="utf-8") == "# mine\n"


def _copy_source(into: Path) -> Path:
    """What the wheel is built from, copied (a build writes build/ and *.egg-info beside its source)."""
    source = into / "source"
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    for package in ("cai_async", "backends"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return source


@pytest.mark.timeout(300)
def test_the_wheel_installs_and_starts_a_project(tmp_path: Path) -> None:
    """Build the wheel offline (this venv's setuptools), install it alone (``--no-deps``) into a new venv that
    borrows this venv's dependencies by a path file, then ``cai init`` + ``cai plan`` with the installed ``cai``."""
    wheels = tmp_path / "wheels"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(wheels), str(_copy_source(tmp_path))], capture_output=True, text=True, timeout=240)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = wheels.glob("cai_async-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert {"cai_async/data/recipes/quickstart.yaml", "cai_async/data/recipes/accelerate/ddp.yaml"} <= names
    assert "License-Expression: Apache-2.0 AND MIT AND CC-BY-4.0" in metadata
    assert "Provides-Extra: batch" in metadata and "Provides-Extra: guard" in metadata
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    # This venv's packages, as a plain path: its .pth files (the editable install of this checkout) are not run.
    (purelib / "borrowed.pth").write_text(sysconfig.get_path("purelib") + "\n", encoding="utf-8")
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
                                "--no-index", str(wheel)], capture_output=True, text=True, timeout=120)
    assert installed.returncode == 0, installed.stderr[-3000:]

    project = tmp_path / "project"
    project.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = subprocess.run([str(python), "-c", "import cai_async; print(cai_async.__file__)"], cwd=project, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(purelib), where
    cai_bin = str(venv / "bin" / "cai")
    init = subprocess.run([cai_bin, "init"], cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert init.returncode == 0, init.stderr
    plan = subprocess.run([cai_bin, "plan", "recipes/quickstart.yaml"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=120)
    assert plan.returncode == 0, plan.stderr
    assert "total" in plan.stdout + plan.stderr
