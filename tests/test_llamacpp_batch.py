"""Continuous batching in the llama.cpp backend, on the embedded SmolLM2 model: concurrent calls share one decode
loop and answer as the one-at-a-time path does."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from backends import BackendSettings, ChatRequest, PermanentError, ScoreRequest, create_backend
from backends.llama_thread import compute_thread
from backends.llamacpp import LlamaCppBackend, embedded_model_path
from backends.llamacpp_batch import BatchDecoder, SamplingOptions
from backends.types import ChatResult, ScoreResult

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

TOPICS = ["the sky", "a cat", "bread", "rain", "a bicycle", "the sea"]


def local(*, max_concurrency: int | None = None, **options: Any) -> LlamaCppBackend:
    """Batched by default; batched and unbatched backends here load the same weights (the F16 copy batching
    uses by default) with the same attention kernels, so they differ only in how calls are batched."""
    settings = BackendSettings(endpoint="local", options={"batching": True, "weights": "f16", "flash_attn": True,
                                                         **options}, max_concurrency=max_concurrency)
    backend = create_backend("llamacpp", settings)
    assert isinstance(backend, LlamaCppBackend)
    return backend


def ask(topic: str, **kwargs: Any) -> ChatRequest:
    return ChatRequest([{"role": "user", "content": f"Write one sentence about {topic}."}], **kwargs)


def choice(topic: str) -> ScoreRequest:
    text = f"Which is kinder about {topic}?\n(A) A warm, helpful remark.\n(B) A cruel insult.\nAnswer A or B."
    return ScoreRequest([{"role": "user", "content": text}], answer_prefix="The answer is (")


async def together(backend: LlamaCppBackend, requests: list[ChatRequest | ScoreRequest]) -> list[Any]:
    """Send every request at once; each slot holds a result or the exception it raised."""
    results: list[Any] = [None] * len(requests)

    async def one(index: int, request: ChatRequest | ScoreRequest) -> None:
        try:
            results[index] = await (backend.chat(request) if isinstance(request, ChatRequest)
                                    else backend.score(request))
        except Exception as exc:
            results[index] = exc

    async with anyio.create_task_group() as tg:
        for index, request in enumerate(requests):
            tg.start_soon(one, index, request)
    return results


async def test_concurrent_greedy_chats_match_the_unbatched_answers() -> None:
    requests = [ask(topic, max_tokens=12) for topic in TOPICS]
    batched = local(max_concurrency=4)
    answers = await together(batched, list(requests))
    alone = local(batching=False)
    same = 0
    for request, answer in zip(requests, answers, strict=True):
        assert isinstance(answer, ChatResult) and answer.text
        expected = await alone.chat(request)
        assert answer.usage.prompt_tokens == expected.usage.prompt_tokens  # the same prompt tokens
        assert answer.text.split()[:2] == expected.text.split()[:2]  # rounding parts answers only at near-ties
        same += answer.text == expected.text
    assert same >= len(requests) // 2
    stats = batched.summary()["decode_loop"]
    assert stats["sequences"] == 4 and stats["most_sequences_in_a_step"] == 4  # 6 calls, 4 at a time
    assert batched.summary()["batching"] == "4 sequences"


@pytest.fixture(scope="module")
def llama() -> Any:
    from llama_cpp import Llama

    return Llama(model_path=str(embedded_model_path()), n_ctx=1024, verbose=False)


async def test_each_sequence_keeps_its_own_stop_and_max_tokens() -> None:
    alone = local(batching=False)
    full = await alone.chat(ask("the sea", max_tokens=16))
    word = full.text.split()[3]  # stop at the fourth word of the greedy answer
    requests = [ask("the sea", max_tokens=16, stop=(word,)), ask("the sea", max_tokens=3),
                ask("bread", max_tokens=16), ask("rain", max_tokens=1)]
    stopped, short, long, one = await together(local(max_concurrency=4), list(requests))
    assert stopped.finish_reason == "stop" and stopped.text == full.text[: full.text.index(word)]
    assert (short.finish_reason, short.usage.completion_tokens) == ("length", 3)
    assert short.text and full.text.startswith(short.text)
    assert long.usage.completion_tokens <= 16 and long.text
    assert one.usage.completion_tokens == 1


async def test_seeded_sampling_repeats_and_each_call_keeps_its_sampler() -> None:
    backend = local(max_concurrency=4)
    seeded = ask("a cat", max_tokens=10, temperature=0.9, seed=7)
    first = await backend.chat(seeded)
    again = await backend.chat(seeded)
    assert first.text and first.text == again.text  # same seed, same company in the batch: same answer
    mixed = await together(backend, [ask("a cat", max_tokens=10), ask("a cat", max_tokens=10, temperature=1.5,
                                                                    seed=1)])
    greedy = await local(batching=False).chat(ask("a cat", max_tokens=10))
    assert mixed[0].text == greedy.text  # the greedy call was not sampled by its neighbour's sampler


async def test_batched_scoring_matches_one_at_a_time() -> None:
    requests: list[ChatRequest | ScoreRequest] = [choice(topic) for topic in TOPICS[:3]]
    requests += [ask(topic, max_tokens=6) for topic in TOPICS[3:]]  # chats decoding in the same batches
    batched = local(max_concurrency=6)
    results = await together(batched, requests)
    alone = local(batching=False)
    for request, result in zip(requests[:3], results[:3], strict=True):
        assert isinstance(request, ScoreRequest) and isinstance(result, ScoreResult)
        expected = await alone.score(request)
        assert result.method == "logits" and result.usage == expected.usage
        for key in ("A", "B"):
            # both paths reuse cached prefixes, and a prompt's logits round slightly differently with where its
            # cached tokens sit in the KV cache (measured: up to ~0.01); greedy decoding above is exact
            assert result.probs[key] == pytest.approx(expected.probs[key], abs=0.02)
    assert all(isinstance(r, ChatResult) and r.text for r in results[3:])


async def test_a_followup_reuses_the_conversation_it_extends() -> None:
    backend = local(max_concurrency=2)
    first = await backend.chat(ask("bread", max_tokens=8))
    before = backend.summary()["decode_loop"]["prompt_tokens_reused"]
    followup = ChatRequest([*ask("bread").messages, {"role": "assistant", "content": first.text},
                            {"role": "user", "content": "Now make it shorter."}], max_tokens=8)
    again = await backend.chat(followup)
    reused = backend.summary()["decode_loop"]["prompt_tokens_reused"] - before
    assert again.text and reused >= first.usage.prompt_tokens  # the whole first prompt was not evaluated again


async def test_context_overflow_fails_only_its_own_call() -> None:
    backend = local(max_concurrency=3, n_ctx=256)
    long = ChatRequest([{"role": "user", "content": "word " * 400}], max_tokens=4)
    results = await together(backend, [ask("rain", max_tokens=6), long, choice("rain"), ask("a cat", max_tokens=6)])
    assert isinstance(results[1], PermanentError) and "n_ctx" in str(results[1])
    assert isinstance(results[0], ChatResult) and results[0].text
    assert isinstance(results[2], ScoreResult) and isinstance(results[3], ChatResult)


def test_generation_stops_at_the_end_of_its_sequence_context(llama: Any) -> None:
    decoder = BatchDecoder(llama, sequences=2, n_ctx=256, batch_tokens=256, n_threads=2, n_threads_batch=2)
    prompt = llama.tokenize(b"one two three " * 100, add_bos=False, special=False)[:253]
    try:
        generation = anyio.run(decoder.generate, prompt, SamplingOptions(max_tokens=100))
    finally:
        decoder.close()
    assert generation.prompt_tokens == 253 and generation.completion_tokens <= 3  # 256 tokens at most
    assert generation.finish_reason == ("length" if generation.completion_tokens == 3 else "stop")


def test_batched_greedy_picks_are_the_unbatched_best_up_to_rounding(llama: Any) -> None:
    """Eight sequences in one batch: llama.cpp's kernels then sum in another order (and a prompt's logits
    round differently with where its cached tokens sit), so logits move by a few hundredths to tenths and
    greedy answers may part ways at a near-tie. Bound: at every step the batched pick is within 0.5 of the best
    logit the unbatched model gives after the same tokens (measured here: at most about 0.2)."""
    import numpy as np

    decoder = BatchDecoder(llama, sequences=8, n_ctx=512, batch_tokens=512, n_threads=2, n_threads_batch=2)
    template = "<|im_start|>user\nWrite two sentences about {}.<|im_end|>\n<|im_start|>assistant\n"
    prompts = [llama.tokenize(template.format(t).encode(), add_bos=False, special=True) for t in TOPICS]

    async def generate() -> list[Any]:
        results: list[Any] = [None] * len(prompts)

        async def one(index: int) -> None:
            results[index] = await decoder.generate(prompts[index], SamplingOptions(max_tokens=24))

        async with anyio.create_task_group() as tg:
            for index in range(len(prompts)):
                tg.start_soon(one, index)
        return results

    try:
        generations = anyio.run(generate)
    finally:
        decoder.close()
    assert decoder.most_sequences == len(prompts)

    def worst_gap() -> float:  # on the compute thread, where all llama.cpp work runs
        worst = 0.0
        for prompt, generation in zip(prompts, generations, strict=True):
            assert generation.tokens and generation.completion_tokens == len(generation.tokens)
            llama.reset()
            llama.eval(prompt)
            for token in generation.tokens:
                logits = np.ctypeslib.as_array(llama._ctx.get_logits(), shape=(llama.n_vocab(),))
                worst = max(worst, float(logits.max() - logits[token]))
                llama.eval([token])
        return worst

    worst = anyio.run(compute_thread.run, worst_gap)
    assert worst <= 0.5


async def test_a_cancelled_call_leaves_the_others_intact() -> None:
    backend = local(max_concurrency=2)
    results: list[Any] = []

    async def keep() -> None:
        results.append(await backend.chat(ask("the sky", max_tokens=8)))

    async with anyio.create_task_group() as tg:
        tg.start_soon(keep)
        with anyio.move_on_after(0.05):
            await backend.chat(ask("a bicycle", max_tokens=200))
    assert results and results[0].text
    later = await backend.chat(ask("the sky", max_tokens=8))
    assert later.text and backend.summary()["decode_loop"]["running_sequences"] == 0  # the cancelled one left
