"""Backends declare themselves: typed options checked when a config is loaded (a misspelled one is a clear error at
start, without importing llama.cpp or torch), and traits the engine reads instead of backend names, so a backend
registered from outside the package is driven like the built-in ones."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import BaseModel, ConfigDict

from backends import BackendSettings, ChatRequest, ChatResult, ConfigError, ScoreRequest, Usage, create_backend
from backends.base import DEFAULT_TRAITS, BackendTraits, BaseBackend, traits_of
from backends.options import parse_options
from backends.registry import register_backend
from backends.types import RateLimitInfo, ScoreResult
from cai_async.configio import validate
from cai_async.engine.config import EngineConfig
from cai_async.engine.scheduler import Engine

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


def _engine_config(*endpoints: dict[str, Any], **engine: Any) -> dict[str, Any]:
    return {"groups": {"policy": list(endpoints)}, "cache": {"enabled": False}, "progress": "off", **engine}


# -- typed options -------------------------------------------------------------------------------------------

MISSPELLED = [
    ({"backend": "openai", "base_url": "http://127.0.0.1:9/v1", "options": {"top_logprob": 5}},
     "unknown option top_logprob for backend openai (did you mean top_logprobs?)", "max_connections, prefill"),
    ({"backend": "openai", "base_url": "http://127.0.0.1:9/v1", "mode": "batch", "options": {"prefil": True}},
     "unknown option prefil for backend openai (did you mean prefill?)", "score_fallback, score_samples"),
    ({"backend": "llamacpp", "model": "embedded", "options": {"n_thread": 2}},
     "unknown option n_thread for backend llamacpp (did you mean n_threads?)", "n_ctx, n_threads, n_threads_batch"),
    ({"backend": "transformers", "model": "/no/such/folder", "options": {"batch_sise": 2}},
     "unknown option batch_sise for backend transformers (did you mean batch_size?)", "batch_size, batch_window_s"),
]


@pytest.mark.parametrize(("endpoint", "message", "allowed"), MISSPELLED, ids=["openai", "batch", "llamacpp", "hf"])
def test_misspelled_option_is_a_config_error_at_load(endpoint: dict[str, Any], message: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate(EngineConfig, _engine_config(endpoint), source="recipe.yaml")
    text = str(info.value)
    assert text.startswith("recipe.yaml: invalid configuration")
    assert f"groups.policy.0.options: {message}; allowed options:" in text and allowed in text


def test_bad_option_values_name_the_option() -> None:
    for options, message in [
        ({"n_ctx": "lots"}, "option n_ctx: Input should be a valid integer"),
        ({"batching": "sometimes"}, "option batching: Input should be a valid boolean"),
        ({"score_method": "vibes"}, "option score_method: Input should be 'logits' or 'logprobs'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            validate(EngineConfig, _engine_config({"backend": "llamacpp", "options": options}))
    good = validate(EngineConfig, _engine_config({"backend": "llamacpp", "options": {"n_threads": 2}}))
    assert good.groups["policy"][0].options == {"n_threads": 2}  # kept as written; the backend parses it again


def test_options_are_checked_without_importing_llama_cpp_or_torch() -> None:
    """Loading a config checks every backend's options from a light module: no llama_cpp, torch or openai."""
    code = (
        "import sys\n"
        "from cai_async.configio import validate\n"
        "from cai_async.engine.config import EngineConfig\n"
        "from backends.errors import ConfigError\n"
        "for backend, bad in [('llamacpp', 'n_thread'), ('transformers', 'batch_sise'), ('openai', 'prefil')]:\n"
        "    try:\n"
        "        validate(EngineConfig, {'groups': {'policy': [{'backend': backend, 'options': {bad: 1}}]}})\n"
        "    except ConfigError as exc:\n"
        "        assert 'unknown option ' + bad in str(exc), exc\n"
        "    else:\n"
        "        raise SystemExit('no error for ' + bad)\n"
        "print(sorted(m for m in ('llama_cpp', 'torch', 'transformers', 'openai') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_cli_stops_at_start_on_a_misspelled_option(tmp_path: Path) -> None:
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("engine:\n  groups:\n    policy:\n      - backend: llamacpp\n        model: embedded\n"
                      "        options:\n          n_thread: 2\ngenerate:\n  input: p.jsonl\n")
    out = subprocess.run([sys.executable, "-c", "from cai_async.cli import main; main()", "run", str(recipe),
                          "--set", f"run_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "unknown option n_thread for backend llamacpp (did you mean n_threads?)" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "run" / "generate").exists()


def test_backends_parse_their_options_with_the_same_models(tmp_path: Path) -> None:
    """Created directly (no config), a backend rejects a misspelled option the same way, naming its endpoint; the
    batch section is one model from the config to the backend (no copied defaults)."""
    cases = [
        ("openai", {"score_fallbak": "sample"}, "unknown option score_fallbak for backend openai"),
        ("openai-batch", {"batch": {"linger": 1}}, "unknown option batch.linger for backend openai-batch "
         "(did you mean linger_s?); allowed options: completion_window, in_flight"),
        ("llamacpp", {"flash_atn": True}, "unknown option flash_atn for backend llamacpp (did you mean flash_attn?)"),
    ]
    for kind, options, message in cases:
        settings = BackendSettings(endpoint="ep", base_url="http://127.0.0.1:9/v1", state_dir=str(tmp_path),
                                   options=options)
        with pytest.raises(ConfigError) as info:
            create_backend(kind, settings)
        assert str(info.value).startswith(f"endpoint 'ep': {message}")
    config = validate(EngineConfig, _engine_config({"backend": "openai", "base_url": "http://127.0.0.1:9/v1",
                                                    "mode": "batch", "batch": {"in_flight": 7, "linger_s": 0.5}}))
    endpoint = config.groups["policy"][0]
    backend = create_backend(endpoint.backend_kind, endpoint.settings(state_dir=str(tmp_path)))
    assert traits_of(backend) == BackendTraits(queues_calls=True, round_items=7, summary_key="batches")
    assert backend._linger == 0.5 and backend._max_requests == 50_000  # type: ignore[attr-defined]


# -- a backend from outside the package -----------------------------------------------------------------------


class RoundOptions(BaseModel):
    """Options of the toy round backend."""

    model_config = ConfigDict(extra="forbid")
    round_size: int = 4
    linger_s: float = 1.0


class RoundBackend(BaseBackend):
    """A toy Batch API: calls wait in a queue and are answered together once ``round_size`` have come, or when
    none has come for ``linger_s``."""

    def __init__(self, settings: BackendSettings) -> None:
        options = parse_options(RoundOptions, settings.options, backend="toy-rounds", endpoint=settings.endpoint)
        self.name = settings.endpoint
        self.size, self.linger_s = options.round_size, options.linger_s
        self.traits = BackendTraits(queues_calls=True, round_items=options.round_size, summary_key="toy_rounds")
        self.rounds: list[int] = []
        self.entered = self.exited = self.closed = 0
        self._queue: list[tuple[ChatRequest, anyio.Event, list[ChatResult]]] = []

    async def __aenter__(self) -> RoundBackend:
        self.entered += 1
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.exited += 1

    async def aclose(self) -> None:
        self.closed += 1

    def _flush(self) -> None:
        queued, self._queue = self._queue, []
        if queued:
            self.rounds.append(len(queued))
        for request, done, slot in queued:
            text = request.messages[-1]["content"].upper()
            slot.append(ChatResult(text=text, finish_reason="stop", usage=Usage(prompt_tokens=3, completion_tokens=1),
                                   model="toy", endpoint=self.name))
            done.set()

    async def chat(self, request: ChatRequest) -> ChatResult:
        done, slot = anyio.Event(), []
        self._queue.append((request, done, slot))
        if len(self._queue) >= self.size:
            self._flush()
        with anyio.move_on_after(self.linger_s):
            await done.wait()
        if not done.is_set():  # no call came for linger_s: the round closes as it is
            self._flush()
        return slot[0]

    def summary(self) -> dict[str, Any]:
        return {"rounds": list(self.rounds)}


class EchoOptions(BaseModel):
    """Options of the toy in-process backend."""

    model_config = ConfigDict(extra="forbid")
    sequences: int = 1
    rate_headers: bool = False


class EchoBackend(BaseBackend):
    """A toy in-process model: keeps calls sharing a prefix together, decodes ``sequences`` at once, and (with
    ``rate_headers``) says it allows 600 requests a minute."""

    def __init__(self, settings: BackendSettings) -> None:
        options = parse_options(EchoOptions, settings.options, backend="toy-echo", endpoint=settings.endpoint)
        self.name = settings.endpoint
        self.traits = BackendTraits(keeps_prefix_together=True, sequences=options.sequences,
                                    sends_rate_limits=options.rate_headers)

    async def chat(self, request: ChatRequest) -> ChatResult:
        return ChatResult(text=request.messages[-1]["content"], finish_reason="stop", usage=Usage(prompt_tokens=1),
                          endpoint=self.name, rate_limit=RateLimitInfo(limit_requests=600, remaining_requests=599))


class PlainBackend:
    """Conforms to the ``Backend`` protocol and nothing more: no base class, no traits, no ``async with``."""

    name = "plain"

    async def chat(self, request: ChatRequest) -> ChatResult:
        return ChatResult(text="plain", finish_reason="stop", usage=Usage(prompt_tokens=1, completion_tokens=1))

    async def score(self, request: ScoreRequest) -> ScoreResult:
        return ScoreResult(probs={"A": 0.5, "B": 0.5}, method="logits")

    async def aclose(self) -> None:
        return None


register_backend("toy-rounds", RoundBackend, options=RoundOptions)
register_backend("toy-echo", EchoBackend, options=EchoOptions)


def test_a_registered_backend_has_its_options_checked_at_load() -> None:
    with pytest.raises(ConfigError, match=r"unknown option round for backend toy-rounds \(did you mean round_size\?\); "
                                          "allowed options: linger_s, round_size"):
        validate(EngineConfig, _engine_config({"backend": "toy-rounds", "options": {"round": 3}}))
    with pytest.raises(ConfigError, match="mode batch needs an OpenAI-compatible endpoint"):
        validate(EngineConfig, _engine_config({"backend": "toy-rounds", "mode": "batch"}))


async def test_engine_drives_a_backend_that_queues_calls_for_rounds(tmp_path: Path) -> None:
    """The engine reads ``queues_calls``: no per-call concurrency limit (the endpoint's max_concurrency of 1 and the
    engine's cap of 2 would answer calls one at a time, each after the linger), ``round_items`` items in flight."""
    config = validate(EngineConfig, _engine_config(
        {"name": "toy", "backend": "toy-rounds", "max_concurrency": 1, "rpm": 6, "options": {"round_size": 4}},
        max_concurrency=2))
    outcomes: dict[int, Any] = {}
    async with Engine(config, run_dir=tmp_path) as engine:
        backend = engine.group("policy")[0].backend
        assert isinstance(backend, RoundBackend) and backend.entered == 1 and backend.exited == 0
        workers = engine.item_concurrency("policy")
        assert workers == 4
        report = await engine.run_batch(
            range(10), lambda i: engine.chat("policy", ChatRequest([{"role": "user", "content": f"item {i}"}])),
            on_result=lambda i, outcome: outcomes.__setitem__(i, outcome), concurrency=workers,
        )
        summary = engine.summary()
    assert report.succeeded == 10 and {i: o.text for i, o in outcomes.items()} == {i: f"ITEM {i}" for i in range(10)}
    assert backend.rounds == [4, 4, 2]  # two full rounds, then the last closed by its linger
    assert summary["toy_rounds"] == {"toy": {"rounds": [4, 4, 2]}}
    assert summary["limits"]["toy"] == {"rpm": None, "tpm": None}  # a queue for rounds has no per-call rate
    assert (backend.entered, backend.exited, backend.closed) == (1, 1, 1)


async def test_engine_reads_prefix_sequences_and_rate_limit_traits(tmp_path: Path) -> None:
    config = validate(EngineConfig, {
        "groups": {
            "policy": [{"name": "a", "backend": "toy-echo", "model": "m1", "options": {"sequences": 3}},
                       {"name": "b", "backend": "toy-echo", "model": "m1", "options": {"sequences": 3}}],
            "critic": [{"name": "c", "backend": "toy-echo", "model": "m2",
                        "options": {"sequences": 2, "rate_headers": True}}],
            "judge": [{"name": "plain", "backend": "plain", "model": "m3"}],
        },
        "cache": {"enabled": False}, "max_concurrency": 64,
    })
    plain = PlainBackend()
    async with Engine(config, run_dir=tmp_path, backends={"plain": plain}) as engine:
        # every endpoint keeps prefixes together: as many items as the models decode together (m1 counted once)
        assert engine.item_concurrency("policy") == 3 and engine.item_concurrency("policy", "critic") == 5
        assert engine.item_concurrency("policy", "judge") == 64  # the plain backend declares nothing: the cap
        for role in ("policy", "critic", "judge"):
            await engine.chat(role, ChatRequest([{"role": "user", "content": "hi"}]))
        summary = engine.summary()
    assert traits_of(plain) is DEFAULT_TRAITS
    assert summary["limits"]["c"]["rpm"] == 600  # learned from what the backend says it sends
    assert summary["limits"]["a"]["rpm"] is None  # a backend without rate-limit headers: nothing learned
    assert "backends" not in summary and "local" not in summary  # none of them has a summary to show
