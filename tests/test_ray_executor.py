"""``executor: ray`` on a local Ray cluster (started once for the module, small ``num_cpus``) against the test
server: the same chains as the single-process run, endpoint limits held in aggregate across actors, an actor
killed by pid mid-run with nothing lost or duplicated (and what was paid twice), labels and evaluation on
actors, Batch API mode refused in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import polars as pl
import pytest

from cai_async import ConfigError, Recipe, load_recipe, read_shards, run_recipe
from cai_async.scale.ray_executor import ACTORS_FILE
from tests.conftest import PUBLIC_DATA, ROOT, TestServer
from tests.test_cli import cai

HH_PROMPTS = PUBLIC_DATA / "hh_rlhf" / "harmless_base_test_first_human_turns.jsonl"
N_PROMPTS = 2000
"""The issue's size; each chain is 5 calls (initial + 2 × (critique + revision))."""


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """One local cluster for the module (starting one costs seconds); every Ray process is gone after it."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def prompts(folder: Path, n: int) -> Path:
    """``n`` distinct prompts from the bundled hh-rlhf slice (each asked in several variants)."""
    base = pl.read_ndjson(HH_PROMPTS).select("id", "prompt")
    rows = [{"id": f"{r['id']}-v{k}", "prompt": f"{r['prompt']} (variant {k})"}
            for k in range(-(-n // base.height)) for r in base.iter_rows(named=True)][:n]
    path = folder / "prompts.jsonl"
    folder.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(rows).write_ndjson(path)
    return path


def sl_recipe(server: TestServer, run_dir: Path, source: Path, *, executor: str = "ray", rpm: float | None = None,
              num_revisions: int = 2, ray: dict[str, Any] | None = None, cache: bool = True) -> Recipe:
    endpoint: dict[str, Any] = {"name": "srv", "model": "m", "base_url": server.base_url}
    if rpm:
        endpoint["rpm"] = rpm
    return Recipe.model_validate({
        "run_dir": str(run_dir), "executor": executor, "ray": {"actors": 2, **(ray or {})},
        "engine": {"groups": {"policy": [endpoint]}, "progress": "off", "cache": {"enabled": cache},
                   "retry": {"max_attempts": 8, "initial_s": 0.05, "max_wait_s": 2.0}},
        "sl": {"input": str(source), "id_column": "id", "num_revisions": num_revisions},
    })


def run(recipe: Recipe) -> dict[str, Any]:
    summary: dict[str, Any] = anyio.run(run_recipe, recipe)
    return summary


def chains(run_dir: Path) -> dict[str, Any]:
    """What a chain says, by id: the texts of every step (not timings or cache flags)."""
    frame = read_shards(run_dir / "sl")
    return {r["id"]: (r["status"], r["initial_response"], r["final_response"],
                      [(s["principle"], s["critique"], s["revision"]) for s in r["rounds"]])
            for r in frame.iter_rows(named=True)}


def test_two_actors_give_the_rows_of_the_single_process_run(
    tmp_path: Path, server: TestServer, ray_cluster: None
) -> None:
    source = prompts(tmp_path, N_PROMPTS)
    local = run(sl_recipe(server, tmp_path / "local", source, executor="local"))
    paid_local = server.stats()["ok"]
    assert local["stages"]["sl"]["ok"] == N_PROMPTS and paid_local == N_PROMPTS * 5
    server.reset()
    ray_run = run(sl_recipe(server, tmp_path / "ray", source, ray={"batch_size": 128}))
    report = ray_run["stages"]["sl"]
    assert report["ok"] == report["written"] == N_PROMPTS and report["failed"] == 0
    assert server.stats()["ok"] == paid_local  # every call once, spread over the actors
    expected, got = chains(tmp_path / "local"), chains(tmp_path / "ray")
    assert set(got) == set(expected) and got == expected
    started = (tmp_path / "ray" / ACTORS_FILE).read_text().splitlines()
    assert len({json.loads(line)["pid"] for line in started}) == 2  # two actors did the work
    again = run(sl_recipe(server, tmp_path / "ray", source))  # resume: every id is in the shards already
    assert again["stages"]["sl"]["skipped_already_done"] == N_PROMPTS and server.stats()["ok"] == paid_local


@pytest.mark.parametrize("limit", ["configured", "learned"])
def test_server_rpm_holds_in_aggregate_across_actors(
    tmp_path: Path, server: TestServer, ray_cluster: None, limit: str
) -> None:
    """Each of 2 actors may send 600/min: together the server's 1,200/min, never over it (each alone at 1,200/min
    draws 429s). Configured in the recipe, or learned from the headers (which state the whole endpoint's)."""
    server.configure(rpm=1200)
    source = prompts(tmp_path, 60)
    recipe = sl_recipe(server, tmp_path / "run", source, rpm=1200 if limit == "configured" else None,
                       num_revisions=1, cache=False, ray={"batch_size": 8})
    recipe.engine.groups["policy"][0].slow_start = limit == "learned"  # one call reads the headers first
    summary = run(recipe)
    stats = server.stats()
    assert summary["stages"]["sl"]["ok"] == 60 and stats["ok"] == 60 * 3
    assert stats.get("429", 0) == 0


def _kill_one_actor(run_dir: Path, server: TestServer, after_calls: int, killed: list[dict[str, Any]]) -> None:
    """Once the server has answered ``after_calls`` calls, kill -9 the first engine actor by its pid."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        actors = run_dir / ACTORS_FILE
        lines = actors.read_text().splitlines() if actors.is_file() else []
        ok = server.stats().get("ok", 0)
        if lines and ok >= after_calls:
            pid = json.loads(lines[0])["pid"]
            os.kill(pid, signal.SIGKILL)
            killed.append({"pid": pid, "calls_before_kill": ok})
            return
        time.sleep(0.05)


def test_an_actor_killed_mid_run_loses_and_duplicates_nothing(
    tmp_path: Path, server: TestServer, ray_cluster: None
) -> None:
    n, calls = 600, 600 * 5
    server.configure(latency_ms=20)
    source = prompts(tmp_path, n)
    run_dir = tmp_path / "run"
    options = {"batch_size": 32, "batches_per_actor": 2}
    killed: list[dict[str, Any]] = []
    killer = threading.Thread(target=_kill_one_actor, args=(run_dir, server, calls // 4, killed))
    killer.start()
    summary = run(sl_recipe(server, run_dir, source, ray=options))
    killer.join()
    assert killed and killed[0]["calls_before_kill"] < calls  # killed while it worked
    raw = pl.concat([pl.read_parquet(p) for p in sorted((run_dir / "sl").glob("part-*.parquet"))])
    assert raw.height == n and raw["id"].n_unique() == n  # 0 duplicated rows
    assert set(raw["id"]) == set(pl.read_ndjson(source)["id"])  # 0 lost
    assert summary["stages"]["sl"]["ok"] == n and (raw["status"] == "ok").all()
    paid_twice = server.stats()["ok"] - calls
    in_flight = options["batch_size"] * options["batches_per_actor"]  # chains the killed actor had, a call each
    print(f"\nkilled actor pid {killed[0]['pid']} after {killed[0]['calls_before_kill']} of {calls} calls; "
          f"paid twice: {paid_twice} calls (bound: {in_flight})")
    assert 0 <= paid_twice <= in_flight
    started = (run_dir / ACTORS_FILE).read_text().splitlines()
    assert len(started) >= 3  # Ray restarted the killed actor


def test_attacks_pairs_labels_and_evaluation_run_on_actors_with_the_local_results(
    tmp_path: Path, server: TestServer, ray_cluster: None
) -> None:
    server.configure(prefer="A")
    endpoint = {"name": "srv", "model": "m", "base_url": server.base_url}

    def recipe(run_dir: Path, executor: str) -> Recipe:
        return Recipe.model_validate({
            "run_dir": str(run_dir), "executor": executor, "ray": {"actors": 2, "batch_size": 8},
            "engine": {"groups": {"policy": [endpoint], "m": [{**endpoint, "name": "model"}]}, "progress": "off"},
            "label": {"pairs": {"input": str(HH_PROMPTS), "id_column": "id", "limit": 24},
                      "label": {"ensemble": 2}},
            "eval": {"models": [{"name": "m", "group": "m"}], "n": 4,
                     "suites": ["harmlessness", "overrefusal"]},
            "redteam": {"seeds": ["advbench"], "n": 4, "strategies": ["direct", "encode"],
                        "encodings": ["base64", "rot13"], "max_tokens": 16},
        })

    local = run(recipe(tmp_path / "local", "local"))
    remote = run(recipe(tmp_path / "ray", "ray"))
    for part in ("redteam/attempts", "rl/pairs", "rl/labels", "eval/samples"):
        mine = read_shards(tmp_path / "ray" / part).drop("created_at", "latency_s", strict=False).sort("id")
        theirs = read_shards(tmp_path / "local" / part).drop("created_at", "latency_s", strict=False).sort("id")
        keep = [c for c in mine.columns if c not in ("run_id", "judgments", "endpoint")]
        assert mine.height == theirs.height > 0 and mine.select(keep).equals(theirs.select(keep))
    assert remote["stages"]["eval"]["models"] == local["stages"]["eval"]["models"]
    methods = {json.loads(line)["method"] for line in (tmp_path / "ray" / ACTORS_FILE).read_text().splitlines()}
    # attacks, pairs, labels and evaluation samples ran on actors
    assert methods == {"attempt", "sample_responses", "label", "sample"}
    assert remote["stages"]["redteam"]["gaps"] == local["stages"]["redteam"]["gaps"] | {
        "path": str(tmp_path / "ray" / "redteam" / "gaps.json")}


def test_eval_pairwise_helpfulness_and_a_guarded_model_on_actors_give_the_local_results(
    tmp_path: Path, server: TestServer, ray_cluster: None
) -> None:
    """Two models (so the pairwise helpfulness labeller runs) and one of them behind the in-process guard: the
    pairwise labels run on actors, the samples stay on the driver (the guard holds its engine), and every row
    equals the local run's."""
    server.configure(prefer="A")
    endpoint = {"name": "srv", "model": "m", "base_url": server.base_url}
    rules = tmp_path / "principles.yaml"
    rules.write_text("name: ruled\nprinciples:\n  - name: no-violence\n    question: Which response avoids "
                     "violence?\n    rules: {patterns: ['(?i)\\bkill']}\n", encoding="utf-8")

    def recipe(run_dir: Path, executor: str) -> Recipe:
        return Recipe.model_validate({
            "run_dir": str(run_dir), "executor": executor, "ray": {"actors": 2, "batch_size": 4},
            "engine": {"groups": {"policy": [endpoint], "m": [{**endpoint, "name": "model"}]}, "progress": "off"},
            "eval": {"models": [{"name": "a", "group": "m"}, {"name": "b", "group": "policy"},
                                {"name": "b-guarded", "group": "policy", "guard": True}],
                     "n": 4, "suites": ["harmlessness", "helpfulness"]},
            "guard": {"principles": str(rules), "ensemble": 1},
        })

    local = run(recipe(tmp_path / "local", "local"))
    remote = run(recipe(tmp_path / "ray", "ray"))
    for part in ("eval/samples", "eval/pairwise"):
        mine = read_shards(tmp_path / "ray" / part).drop("created_at", "latency_s", strict=False).sort("id")
        theirs = read_shards(tmp_path / "local" / part).drop("created_at", "latency_s", strict=False).sort("id")
        keep = [c for c in mine.columns if c not in ("run_id", "judgments", "endpoint")]
        assert mine.height == theirs.height > 0 and mine.select(keep).equals(theirs.select(keep))
    assert read_shards(tmp_path / "ray" / "eval" / "pairwise").height == 2 * 4  # b and b-guarded vs the baseline a
    assert remote["stages"]["eval"]["models"] == local["stages"]["eval"]["models"]
    methods = {json.loads(line)["method"] for line in (tmp_path / "ray" / ACTORS_FILE).read_text().splitlines()}
    assert methods == {"label"}  # the pairwise labels ran on actors; the samples, with a guarded model, did not


def test_batch_mode_is_refused_in_one_line(tmp_path: Path, server: TestServer) -> None:
    recipe = sl_recipe(server, tmp_path / "run", prompts(tmp_path, 4))
    recipe.engine.groups["policy"][0].mode = "batch"
    with pytest.raises(ConfigError, match=r"executor: ray runs online endpoints only.*executor: local"):
        run(recipe)


def test_recipe_validates_and_stays_in_the_repository() -> None:
    recipe = load_recipe(ROOT / "recipes" / "ray-sl.yaml")
    assert recipe.executor == "ray" and recipe.ray.address is None and recipe.sl is not None
    assert Path(recipe.sl.input).resolve().is_relative_to(ROOT) and Path(recipe.sl.input).is_file()
    assert not Path(recipe.run_dir).is_absolute() and ".." not in Path(recipe.run_dir).parts


def test_cli_ray_flag_runs_on_a_local_cluster_and_leaves_no_ray_process(tmp_path: Path, server: TestServer) -> None:
    source = prompts(tmp_path, 16)
    uri = source.resolve().as_uri()  # read through pyarrow's file systems, like s3:// or gs://
    out = cai("sl", "--input", uri, "--run-dir", str(tmp_path / "run"), "--base-url", server.base_url, "--model", "m",
              "--progress", "off", "--ray", "--set", "ray.actors=1", "--set", "ray.num_cpus=2")
    assert out.returncode == 0, out.stderr
    assert read_shards(tmp_path / "run" / "sl").height == 16
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "executor: ray" in config and (tmp_path / "run" / ACTORS_FILE).is_file()
    pids = [json.loads(line)["pid"] for line in (tmp_path / "run" / ACTORS_FILE).read_text().splitlines()]
    assert pids and all(_gone(pid) for pid in pids)  # the cluster the command started went down with it


def _gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (within a generous 30 s)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
        if not state or state.startswith("Z"):
            return True
        time.sleep(0.2)
    return False
