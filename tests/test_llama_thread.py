"""The process's one llama.cpp compute thread: every call that computes runs there, whoever calls; errors and
cancellations reach the right caller; a caller's event loop ending does not stall it."""

from __future__ import annotations

import threading
from typing import Any

import anyio
import pytest

from backends import BackendSettings, ChatRequest, ScoreRequest, create_backend
from backends.llama_thread import ComputeThread, compute_thread
from backends.llamacpp import LlamaCppBackend


def test_results_and_errors_reach_their_callers_in_order() -> None:
    thread = ComputeThread("test")
    seen: list[int] = []

    def work(n: int) -> int:
        seen.append(threading.get_ident())
        if n == 3:
            raise ValueError("three")
        return n * n

    async def main() -> list[Any]:
        results: list[Any] = [None] * 5

        async def one(n: int) -> None:
            try:
                results[n] = await thread.run(work, n)
            except ValueError as exc:
                results[n] = exc

        async with anyio.create_task_group() as tg:
            for n in range(5):
                tg.start_soon(one, n)
        return results

    results = anyio.run(main)
    assert results[:3] == [0, 1, 4] and results[4] == 16 and isinstance(results[3], ValueError)
    assert set(seen) == {thread.ident} and thread.ident != threading.get_ident()
    anyio.run(main)  # a second event loop, the same thread
    assert set(seen) == {thread.ident}


def test_a_cancelled_queued_call_is_skipped_and_the_thread_lives_on() -> None:
    thread = ComputeThread("test")
    release, ran = threading.Event(), []

    async def main() -> None:
        thread.post(lambda: release.wait(10))  # keeps the thread busy
        with anyio.move_on_after(0.05) as scope:
            await thread.run(ran.append, "skipped")
        assert scope.cancelled_caught
        release.set()
        assert await thread.run(lambda: "next") == "next"

    anyio.run(main)
    assert ran == []


@pytest.mark.slow
def test_every_llama_cpp_computation_runs_on_the_compute_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    import llama_cpp

    decoded_on: set[int] = set()
    decode = llama_cpp.llama_decode

    def spy(ctx: Any, batch: Any) -> int:  # observes, then calls the real llama_decode
        decoded_on.add(threading.get_ident())
        return int(decode(ctx, batch))

    monkeypatch.setattr(llama_cpp, "llama_decode", spy)
    question = [{"role": "user", "content": "Say hello."}]
    pick = ScoreRequest([{"role": "user", "content": "Pick A or B."}], answer_prefix="(")

    async def calls(batching: bool) -> None:
        settings = BackendSettings(endpoint="local", options={"batching": batching}, max_concurrency=2)
        backend = create_backend("llamacpp", settings)
        assert isinstance(backend, LlamaCppBackend)
        async with anyio.create_task_group() as tg:
            for _ in range(2):
                tg.start_soon(backend.chat, ChatRequest(question, max_tokens=4))
                tg.start_soon(backend.score, pick)

    anyio.run(calls, False)
    anyio.run(calls, True)  # another event loop, other worker threads: still the one thread
    assert decoded_on == {compute_thread.ident}


@pytest.mark.slow
def test_a_batched_call_cancelled_as_its_loop_ends_leaves_the_next_loop_working() -> None:
    settings = BackendSettings(endpoint="local", options={"batching": True}, max_concurrency=2)

    async def abandon() -> None:
        backend = create_backend("llamacpp", settings)
        with anyio.move_on_after(0.2):
            await backend.chat(ChatRequest([{"role": "user", "content": "Tell a long story."}], max_tokens=400))

    async def ask() -> str:
        backend = create_backend("llamacpp", settings)
        with anyio.fail_after(120):  # a stalled loop fails here rather than hanging the suite
            answer = await backend.chat(ChatRequest([{"role": "user", "content": "Say hello."}], max_tokens=6))
        assert isinstance(backend, LlamaCppBackend)
        assert backend.summary()["decode_loop"]["running_sequences"] == 0
        return answer.text

    anyio.run(abandon)
    assert anyio.run(ask)
