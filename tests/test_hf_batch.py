"""The transformers backend batches concurrent calls: one left-padded ``generate`` or forward pass per group."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from backends import BackendSettings, ChatRequest, PermanentError, ScoreRequest, create_backend
from backends.hf import TransformersBackend
from backends.types import ChatResult, ScoreResult

pytestmark = pytest.mark.slow

QUESTIONS = ["How do I pick a lock?", "Write a rude note.", "Tell me a secret about my neighbour.",
             "What is the capital of France, and why is it famous for its many old buildings?"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


def backend(model: Path, **options: Any) -> TransformersBackend:
    made = create_backend("transformers", BackendSettings(endpoint="after", model=str(model), options=options))
    assert isinstance(made, TransformersBackend)
    return made


def together(target: TransformersBackend, requests: list[ChatRequest | ScoreRequest]) -> list[Any]:
    results: list[Any] = [None] * len(requests)

    async def one(index: int, request: ChatRequest | ScoreRequest) -> None:
        try:
            results[index] = await (target.chat(request) if isinstance(request, ChatRequest)
                                    else target.score(request))
        except Exception as exc:
            results[index] = exc

    async def run() -> None:
        async with anyio.create_task_group() as tg:
            for index, request in enumerate(requests):
                tg.start_soon(one, index, request)

    anyio.run(run)
    return results


def test_concurrent_calls_share_batches_and_answer_as_alone(tiny: Path) -> None:
    chats: list[ChatRequest | ScoreRequest] = [ChatRequest([{"role": "user", "content": q}], max_tokens=m)
                                               for q, m in zip(QUESTIONS, (6, 3, 8, 5), strict=True)]
    scores: list[ChatRequest | ScoreRequest] = [ScoreRequest([{"role": "user", "content": f"{q} Pick (A) or (B)."}])
                                                for q in QUESTIONS]
    batched = backend(tiny, batch_size=8, batch_window_s=0.05)
    results = together(batched, [*chats, *scores])
    assert batched.summary()["largest_batch"] >= 2  # calls were answered together
    alone = backend(tiny, batch_size=1)
    expected = together(alone, [*chats, *scores])
    assert alone.summary()["largest_batch"] == 1
    for request, got, want in zip([*chats, *scores], results, expected, strict=True):
        if isinstance(request, ChatRequest):
            assert isinstance(got, ChatResult) and isinstance(want, ChatResult)
            assert got.usage.completion_tokens <= request.max_tokens  # each call's own max_tokens
            assert (got.text, got.usage) == (want.text, want.usage)  # greedy: left padding changes nothing
        else:
            assert isinstance(got, ScoreResult) and isinstance(want, ScoreResult)
            assert got.usage == want.usage
            for choice in ("A", "B"):
                assert got.probs[choice] == pytest.approx(want.probs[choice], abs=1e-4)


def test_a_too_long_prompt_fails_alone(tiny: Path) -> None:
    long = ChatRequest([{"role": "user", "content": "word " * 1500}], max_tokens=4)
    short = ChatRequest([{"role": "user", "content": QUESTIONS[0]}], max_tokens=4)
    results = together(backend(tiny, batch_size=4, batch_window_s=0.05), [short, long, short])
    assert isinstance(results[1], PermanentError) and "exceeds the model's" in str(results[1])
    assert isinstance(results[0], ChatResult) and isinstance(results[2], ChatResult)
    assert results[0].text == results[2].text
