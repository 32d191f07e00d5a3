"""``cai reward serve`` over real HTTP on loopback, called by OpenRLHF 0.11.2's own client code
(``SingleTurnAgentExecutor._fetch_rewards_via_http``, vendored unchanged in tests/vendor: the package's
``__init__`` files import torch and DeepSpeed, the client itself needs only aiohttp), scored by the test server
as the judge; the reward-model path against a tiny sequence classifier; ``cai train rl`` with ``ppo``."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import anyio
import polars as pl
import pytest

from cai_async import EngineConfig
from cai_async.train.config import RewardServerConfig, TrainConfig
from cai_async.train.reward_server import RewardService, serve_rewards, service_for, split_query
from tests.conftest import TestServer, listening_line
from tests.test_cli import CAI, cai

VENDOR = Path(__file__).parent / "vendor" / "openrlhf_0_11_2"
REFUSE = "I refuse to help with that"


def openrlhf_agent(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``openrlhf.utils.agent`` from the 0.11.2 wheel, its parent packages as bare namespaces."""
    for name in ("openrlhf", "openrlhf.utils"):
        package = types.ModuleType(name)
        package.__path__ = []
        monkeypatch.setitem(sys.modules, name, package)
    for name in ("logging_utils", "agent"):
        spec = importlib.util.spec_from_file_location(f"openrlhf.utils.{name}", VENDOR / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, f"openrlhf.utils.{name}", module)
        spec.loader.exec_module(module)
    return sys.modules["openrlhf.utils.agent"]


def chatml(user: str) -> str:
    return f"<|im_start|>system\nBe helpful.<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def engine_config(server: TestServer) -> EngineConfig:
    return EngineConfig.model_validate({"groups": {"critic": [{"backend": "openai", "model": "m",
                                                               "base_url": server.base_url}]}, "progress": "off"})


async def with_server(service: RewardService, work: Any) -> Any:
    """Run ``service`` on a free loopback port while ``work(url)`` runs; return what it returns."""
    stop, ready, port = anyio.Event(), anyio.Event(), [0]
    result: list[Any] = []

    def bound(number: int) -> None:
        port[0] = number
        ready.set()

    async def client() -> None:
        await ready.wait()
        try:
            result.append(await work(f"http://127.0.0.1:{port[0]}/get_reward"))
        finally:
            stop.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(client)
        await serve_rewards(service, on_ready=bound, stop=stop, signals=False)
    return result[0]


def test_split_query_reads_back_the_conversation_and_the_response() -> None:
    prompt = chatml("How do I bake bread?")
    head, response = split_query(prompt + "Knead, rise, bake.<|im_end|>", prompt)
    assert head == [{"role": "system", "content": "Be helpful."}, {"role": "user", "content": "How do I bake bread?"}]
    assert response == "Knead, rise, bake."
    llama = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
             "<|start_header_id|>assistant<|end_header_id|>\n\nHello there<|eot_id|>")
    assert split_query(llama, None) == ([{"role": "user", "content": "Hi"}], "Hello there")
    assert split_query("plain prompt. plain answer", "plain prompt.") == ("plain prompt.", "plain answer")


def test_openrlhf_client_gets_constitutional_rewards_batched_and_cached(
    tmp_path: Path, server: TestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = openrlhf_agent(monkeypatch)
    server.configure(prefer="A", prefer_when={REFUSE: "B"}, record=True)
    config = TrainConfig(rl_ensemble=2, reward_server=RewardServerConfig(port=0, max_batch=8))
    prompts = [chatml(f"Question {i}: how do I fix my bike?") for i in range(20)]
    answers = [f"{REFUSE}, sorry." if i % 4 == 0 else f"Answer {i}: check the chain." for i in range(20)]
    queries = [p + a + "<|im_end|>" for p, a in zip(prompts, answers, strict=True)]
    labels = [""] * 20

    async def main() -> tuple[list[Any], list[Any], dict[str, int], int]:
        service = await service_for(config, tmp_path / "run", engine_config(server))

        async def work(url: str) -> tuple[list[Any], list[Any], dict[str, int], int]:
            executor = agent.SingleTurnAgentExecutor(remote_rm_url=url)
            first = await executor._fetch_rewards_via_http(queries, prompts, labels)
            calls = server.stats()["ok"]
            singles = [await executor._fetch_rewards_via_http([q], [p], [""])  # as rollouts send them: one each
                       for q, p in zip(queries[:5], prompts[:5], strict=True)]
            assert server.stats()["ok"] == calls  # every repeat came from the cache
            return first, singles, dict(service.stats), calls

        result: tuple[list[Any], list[Any], dict[str, int], int] = await with_server(service, work)
        return result

    first, singles, stats, calls = anyio.run(main)
    (answer,) = first  # one server, one request
    rewards = answer["rewards"]
    assert answer["scores"] == rewards and len(rewards) == 20
    for index, reward in enumerate(rewards):
        assert reward == pytest.approx(0.1 if index % 4 == 0 else 0.9, abs=1e-6)
    assert [s[0]["rewards"] for s in singles] == [[r] for r in rewards[:5]]
    assert calls == 20 * 2  # two principles a completion, asked once
    assert stats["queries"] == 25 and stats["cache_hits"] == 5 and stats["batches"] < 20
    judged = [m[-1]["content"] for m in server.requests()]
    assert any("Human: Question 1: how do I fix my bike?" in t and "Answer 1: check the chain." in t for t in judged)
    assert not any("<|im_end|>" in t or "<|im_start|>" in t for t in judged)  # the template is taken off


def test_bad_requests_get_one_clear_line(tmp_path: Path, server: TestServer) -> None:
    import aiohttp

    config = TrainConfig(reward_server=RewardServerConfig(port=0))

    async def main() -> list[tuple[int, Any]]:
        service = await service_for(config, tmp_path / "run", engine_config(server))

        async def work(url: str) -> list[tuple[int, Any]]:
            out = []
            async with aiohttp.ClientSession() as session:
                for body in (b"not json", json.dumps({"query": "one text"}).encode(),
                             json.dumps({"query": ["a", "b"], "prompts": ["a"]}).encode(),
                             json.dumps({"query": ["x @@status:400@@"]}).encode()):
                    async with session.post(url, data=body) as response:
                        out.append((response.status, await response.json()))
            return out

        answers: list[tuple[int, Any]] = await with_server(service, work)
        return answers

    answers = anyio.run(main)
    assert [status for status, _ in answers] == [400, 400, 400, 502]
    assert "not JSON" in answers[0][1]["error"] and "'query' must be a list" in answers[1][1]["error"]
    assert "as long as 'query' (2)" in answers[2][1]["error"]
    assert answers[3][1]["error"].startswith("PermanentError") and "\n" not in answers[3][1]["error"]


def test_reward_model_rewards_are_the_models_scores(tmp_path: Path) -> None:
    import torch

    from cai_async.train.models import load_model, load_tokenizer
    from tests.tiny import build_tiny_model

    tiny = build_tiny_model(tmp_path / "tiny")
    model = load_model(str(tiny), task="reward")
    model.save_pretrained(tmp_path / "rm")
    load_tokenizer(str(tiny)).save_pretrained(tmp_path / "rm")
    config = TrainConfig(reward_from="reward_model",
                         reward_server=RewardServerConfig(port=0, reward_model=str(tmp_path / "rm")))
    prompts = [chatml(f"Tell me about topic {i}") for i in range(6)]
    answers = ["Short.", "A much longer answer about the topic with many words in it.", "Sure.", REFUSE,
               "Here is a safer answer.", "Okay then."]
    queries = [p + a + "<|im_end|>" for p, a in zip(prompts, answers, strict=True)]

    async def main() -> Any:
        import aiohttp

        service = await service_for(config, tmp_path / "run")

        async def work(url: str) -> Any:
            async with aiohttp.ClientSession() as session, \
                    session.post(url, json={"query": queries, "prompts": prompts, "labels": [""] * 6}) as response:
                assert response.status == 200
                return await response.json()

        return await with_server(service, work)

    rewards = anyio.run(main)["rewards"]
    tokenizer = load_tokenizer(str(tmp_path / "rm"))
    scorer = load_model(str(tmp_path / "rm"), task="reward").eval()
    for query_prompt, answer, reward in zip(prompts, answers, rewards, strict=True):  # one at a time, no padding
        turns, _ = split_query(query_prompt, query_prompt)
        text = tokenizer.apply_chat_template([*turns, {"role": "assistant", "content": answer}], tokenize=False)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            expected = float(scorer(**ids).logits[0, 0])
        assert reward == pytest.approx(expected, abs=1e-4)
    assert len(set(rewards)) > 1


def _dpo_run(tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    prompt = pl.Series([[{"role": "user", "content": f"question {i}"}] for i in range(3)])
    pl.DataFrame({"id": ["a", "b", "c"], "prompt": prompt}).write_parquet(
        (run_dir / "exports").mkdir(parents=True) or run_dir / "exports" / "dpo.parquet")
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "config.json").write_text("{}")
    return run_dir


def test_ppo_dry_run_writes_openrlhfs_command(tmp_path: Path) -> None:
    run_dir = _dpo_run(tmp_path)
    out = cai("train", "rl", "--dry-run", "--model", str(tmp_path / "policy"), "--run-dir", str(run_dir),
              "--rl-algorithm", "ppo", "--set", "train.rl_learning_rate=1e-6", "--set", "train.beta=0.05",
              "--set", "train.reward_server.port=5123")
    assert out.returncode == 0, out.stderr
    command = shlex.split(out.stdout.strip().splitlines()[-1])
    assert command[1:3] == ["-m", "openrlhf.cli.train_ppo_ray"]
    known = {line for line in (VENDOR / "train_ppo_ray_flags.txt").read_text().splitlines()
             if line.startswith("--")}
    flags = [token for token in command if token.startswith("--")]
    assert flags and not [f for f in flags if f not in known]  # every flag is one OpenRLHF 0.11.2 parses
    value = {flag: command[i + 1] for i, flag in enumerate(command[:-1]) if flag.startswith("--")}
    assert value["--reward.remote_url"] == "http://127.0.0.1:5123/get_reward"
    assert value["--actor.model_name_or_path"] == str(tmp_path / "policy")
    assert value["--actor.adam.lr"] == "1e-06" and value["--algo.kl.init_coef"] == "0.05"
    assert value["--algo.advantage.estimator"] == "gae" and "--data.apply_chat_template" in flags
    folder = run_dir / "train" / "rl" / "openrlhf"
    assert shlex.split((folder / "launch.sh").read_text().splitlines()[-1]) == command
    assert json.loads((folder / "config.json").read_text())["command"] == command
    rows = [json.loads(line) for line in Path(value["--data.prompt_dataset"]).read_text().splitlines()]
    assert rows == [{"input": [{"role": "user", "content": f"question {i}"}]} for i in range(3)]


@pytest.mark.allowed_skip
def test_ppo_without_openrlhf_says_what_to_install(tmp_path: Path) -> None:
    from cai_async.train.ppo import missing_openrlhf

    if not missing_openrlhf():
        pytest.skip("the OpenRLHF stack is installed here")
    run_dir = _dpo_run(tmp_path)
    out = cai("train", "rl", "--model", str(tmp_path / "policy"), "--run-dir", str(run_dir), "--set",
              "train.rl_algorithm=ppo")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    line = out.stderr.strip().splitlines()[-1]
    assert "pip install 'cai-async[openrlhf]'" in line and "CUDA GPUs" in line
    assert f"missing: {', '.join(missing_openrlhf())}" in line


def test_ppo_that_fails_at_run_time_stops_with_exit_4(tmp_path: Path) -> None:
    """OpenRLHF started and exited with an error: the input was fine, so not exit 2 ("nothing ran; fix the
    input") but 4 (the run stopped), with one line that names OpenRLHF's log."""
    from cai_async.train.ppo import OPENRLHF_MODULES

    stubs = tmp_path / "stubs"
    for name in [m for m in OPENRLHF_MODULES if importlib.util.find_spec(m) is None or m == "openrlhf"]:
        (stubs / name).mkdir(parents=True)
        (stubs / name / "__init__.py").write_text("")
    (stubs / "openrlhf" / "cli").mkdir()
    (stubs / "openrlhf" / "cli" / "__init__.py").write_text("")
    (stubs / "openrlhf" / "cli" / "train_ppo_ray.py").write_text(
        "import sys\nprint('torch.OutOfMemoryError: CUDA out of memory')\nsys.exit(1)\n")
    run_dir = _dpo_run(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(stubs), *filter(None, [os.environ.get("PYTHONPATH")])])}
    out = cai("train", "rl", "--model", str(tmp_path / "policy"), "--run-dir", str(run_dir), "--set",
              "train.rl_algorithm=ppo", "--set", "train.ppo.serve_reward=false", env=env)
    assert out.returncode == 4, out.stderr
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("stopped: OpenRLHF exited with status 1") and "Traceback" not in out.stderr, line
    log = run_dir / "train" / "rl" / "openrlhf" / "openrlhf.log"
    assert str(log) in line and "CUDA out of memory" in log.read_text()


def test_cli_reward_serve(tmp_path: Path, server: TestServer) -> None:
    import urllib.request

    server.configure(prefer="A")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"run_dir": str(tmp_path / "run"), "engine": engine_config(server).model_dump(
        mode="json"), "train": {"reward_server": {"port": 0}}}))
    process = subprocess.Popen([*CAI, "reward", "serve", str(recipe)], stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        line = listening_line(process.stderr)
        url = line.split("listening on ")[1].split()[0]
        request = urllib.request.Request(url, data=json.dumps({"query": [chatml("hi") + "hello"],
                                                               "prompts": [chatml("hi")], "labels": [""]}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert json.loads(response.read())["rewards"] == [pytest.approx(0.9, abs=1e-6)]
    finally:
        process.terminate()
        _, err = process.communicate(timeout=30)
    assert process.returncode == 0 and "stopped after 1 queries" in err


def test_ppo_recipe_maps_onto_openrlhf_flags(tmp_path: Path) -> None:
    from cai_async.recipes import load_recipe
    from cai_async.train.ppo import ppo_command

    run_dir = _dpo_run(tmp_path)
    recipe = load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "ppo-openrlhf.yaml",
                         [f"train.model={tmp_path / 'policy'}"])
    assert recipe.train is not None and recipe.train.rl_algorithm == "ppo"
    command, spec = ppo_command(recipe.train, run_dir, reward_url=recipe.train.reward_server.url)
    flags = spec["flags"]
    assert flags["--reward.remote_url"] == "http://127.0.0.1:5000/get_reward"
    assert (flags["--actor.adam.lr"], flags["--algo.kl.init_coef"], flags["--rollout.batch_size"]) == (1e-6, 0.01, 16)
    assert flags["--train.batch_size"] == 2 * 4 * 1 and flags["--train.colocate_all"] is True
    assert "--ds.lora.rank" not in flags and "--train.colocate_all" in command
    from backends.errors import ConfigError

    with pytest.raises(ConfigError, match="is a GGUF model; OpenRLHF"):
        ppo_command(recipe.train.model_copy(update={"model": "embedded"}), run_dir, reward_url="http://x")
