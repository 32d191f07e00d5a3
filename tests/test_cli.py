"""The ``cai`` command line: help, clear errors for bad input, generate with resume, and kill -9 safety."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from cai_async import read_shards
from tests.conftest import PUBLIC_DATA, TestServer, kill_repeatedly

CAI = [sys.executable, "-c", "from cai_async.cli import main; main()"]


def cai(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CAI, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_help_and_version() -> None:
    assert "generate" in cai("--help").stdout
    out = cai("version")
    assert out.returncode == 0 and out.stdout.startswith("cai-async ")


@pytest.mark.parametrize(
    ("recipe", "pattern"),
    [
        ("engine:\n  max_concurency: 3\n", "engine.max_concurency: unknown key"),
        ("engine:\n  groups:\n    policy:\n      - backend: nope\n        model: x\ngenerate:\n  input: p.jsonl\n",
         "unknown backend 'nope'"),
        ("engine:\n  groups:\n    policy:\n      - backend: llamacpp\n        model: /no/such.gguf\n"
         "generate:\n  input: p.jsonl\n", "no such file"),
        ("engine: [1, 2\n", "not valid YAML"),
        ("engine:\n  groups:\n    policy:\n      - backend: llamacpp\ngenerate:\n  input: missing.jsonl\n",
         "prompt file not found"),
    ],
)
def test_bad_config_is_one_clear_line(tmp_path: Path, recipe: str, pattern: str) -> None:
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe)
    out = cai("run", str(path), "--set", f"run_dir={tmp_path / 'run'}")
    assert out.returncode == 2, out.stderr
    assert pattern in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("content", "pattern"),
    [("", "prompt file is empty"), ('{"text": "hi"}\n', "no prompt column 'prompt' \\(columns: text\\)")],
)
def test_bad_prompt_files(tmp_path: Path, server: TestServer, content: str, pattern: str) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(content)
    out = cai("generate", "--input", str(prompts), "--base-url", server.base_url, "--model", "m",
              "--run-dir", str(tmp_path / "run"))
    assert out.returncode == 2
    assert pytest.importorskip("re").search(pattern, out.stderr), out.stderr


def test_generate_hh_rlhf_prompts_through_test_server(tmp_path: Path, server: TestServer) -> None:
    source = PUBLIC_DATA / "hh_rlhf" / "harmless_base_test_first_human_turns.jsonl"
    run_dir = tmp_path / "run"
    args = ["generate", "--input", str(source), "--limit", "50", "--base-url", server.base_url, "--model", "m",
            "--run-dir", str(run_dir), "--progress", "off", "--set", "generate.id_column=id"]
    out = cai(*args)
    assert out.returncode == 0, out.stderr
    frame = read_shards(run_dir / "generate")
    expected = pl.read_ndjson(source).head(50)
    assert sorted(frame["id"].to_list()) == sorted(str(i) for i in expected["id"].to_list())
    assert frame["response"].str.starts_with("Reply ").all()
    assert server.stats()["ok"] == 50
    again = cai(*args)
    assert again.returncode == 0 and "0 written, 50 already done" in again.stderr
    assert server.stats()["ok"] == 50
    assert (run_dir / "summary.json").is_file() and (run_dir / "config.yaml").is_file()


def test_empty_answers_and_failures_are_recorded_not_lost(tmp_path: Path, server: TestServer) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "fine"}\n{"prompt": "bad @@status:400@@"}\n{"prompt": "quiet @@empty@@"}\n')
    out = cai("generate", "--input", str(prompts), "--base-url", server.base_url, "--model", "m",
              "--run-dir", str(tmp_path / "run"), "--progress", "off")
    assert out.returncode == 3, out.stderr  # finished, with a failed item
    assert "2 written" in out.stderr and "1 failed" in out.stderr and "rejected (400)" in out.stderr
    frame = read_shards(tmp_path / "run" / "generate")
    assert sorted(frame["response"].to_list())[0] == ""


def test_kill_9_mid_run_loses_nothing_and_repays_little(tmp_path: Path, server: TestServer) -> None:
    server.configure(latency_ms=40)
    prompts = tmp_path / "p.jsonl"
    n = 400
    prompts.write_text("".join(f'{{"prompt": "question number {i}"}}\n' for i in range(n)))
    concurrency = 16
    args = [*CAI, "generate", "--input", str(prompts), "--base-url", server.base_url, "--model", "m",
            "--run-dir", str(tmp_path / "run"), "--progress", "off", "--max-concurrency", str(concurrency),
            "--set", "generate.shard_rows=25"]
    kills = kill_repeatedly(args, (1.0, 1.5, 0.7), server)
    assert kills == 3, "the run finished before it could be killed; raise n"
    final = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stderr
    frame = read_shards(tmp_path / "run" / "generate", unique_by=None)
    assert frame.height == n  # no lost and no duplicated rows
    assert frame["id"].n_unique() == n
    stats = server.stats()
    assert stats["unique"] == n
    assert stats["repeats"] <= kills * concurrency  # at most the calls in flight at each kill were paid again


def test_precedence_defaults_then_yaml_then_flags(tmp_path: Path) -> None:
    import yaml

    recipe = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml"
    shown = yaml.safe_load(cai("config", str(recipe)).stdout)
    assert shown["engine"]["max_concurrency"] == 16  # from the YAML (default is 256)
    assert shown["engine"]["retry"]["max_attempts"] == 8  # a default
    assert shown["sl"]["input"].endswith("cai_async/data/quickstart_prompts.jsonl")
    assert Path(shown["sl"]["input"]).is_file()  # resolved against the recipe's folder
    assert shown["sl"]["constitution"] == "seed"  # a built-in name is not taken for a path
    assert Path(shown["sl"]["export"]["helpful"]["input"]).is_file()
    shown = yaml.safe_load(cai("config", str(recipe), "--set", "engine.max_concurrency=8").stdout)
    assert shown["engine"]["max_concurrency"] == 8  # the flag wins


def test_ctrl_c_keeps_finished_rows_and_cache_commands(tmp_path: Path, server: TestServer) -> None:
    server.configure(latency_ms=50)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(f'{{"prompt": "ctrl-c question {i}"}}\n' for i in range(300)))
    run_dir = tmp_path / "run"
    args = [*CAI, "generate", "--input", str(prompts), "--base-url", server.base_url, "--model", "m",
            "--run-dir", str(run_dir), "--progress", "rich", "--max-concurrency", "8",
            "--set", "generate.shard_rows=1000"]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60  # interrupt once it works, however slowly a busy machine starts it
    while server.stats().get("ok", 0) < 24 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 130, err
    assert "rerun the same command to resume" in err
    kept = read_shards(run_dir / "generate")
    assert 0 < kept.height < 300  # rows finished before Ctrl-C were flushed although no shard was full
    stats = cai("cache", "stats", str(run_dir))
    cached = int(stats.stdout.split(": ")[1].split()[0])
    assert cached >= kept.height
    cleared = cai("cache", "clear", str(run_dir))
    assert f"cleared {cached} cached calls" in cleared.stdout
    assert "0 cached calls" in cai("cache", "stats", str(run_dir)).stdout
